//! The manifest source: Services and EndpointSlices read from YAML or JSON
//! files in a folder (multi-document YAML allowed). A file that does not
//! parse is reported with file, document and reason, and the objects it held
//! the last time it parsed stay in effect.

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::source::listed::{Manifest, ManifestFields};
use serde::Deserialize;

use crate::source::objects::{ServiceInfo, SliceInfo};

/// The objects of the folder, as translation reads them (the same form
/// the API source keeps).
#[derive(Clone, Debug, Default)]
pub struct ManifestSet {
    pub services: Vec<ServiceInfo>,
    pub slices: Vec<SliceInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based index of the document in the file (0: the file itself).
    pub document: usize,
    /// `Kind name` when it could be read.
    pub object: Option<String>,
    pub reason: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.document > 0 {
            write!(f, " document {}", self.document)?;
        }
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Parses every document of one file. Kinds other than Service and
/// EndpointSlice (Deployments, ConfigMaps, ...) are ignored.
pub(crate) fn parse_documents(file: &Path, text: &str) -> (ManifestSet, Vec<ManifestError>) {
    let mut set = ManifestSet::default();
    let mut errors = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |object: Option<String>, reason: String| ManifestError {
            file: file.to_owned(),
            document: i + 1,
            object,
            reason,
        };
        let fields = match Option::<ManifestFields>::deserialize(doc) {
            Ok(Some(fields)) => fields,
            // An empty document.
            Ok(None) => continue,
            Err(e) => match unreadable_document(text, i, e) {
                Unreadable::Ignored => continue,
                Unreadable::Object(name, reason) => {
                    errors.push(err(name, reason));
                    continue;
                }
                Unreadable::Stream(reason) => {
                    errors.push(err(None, reason));
                    // A syntax error leaves the rest of the stream unreadable.
                    break;
                }
            },
        };
        match read_object(&mut set, fields) {
            Ok(None) => {}
            Ok(Some((items, item_kind))) => {
                for (j, item) in items.into_iter().enumerate() {
                    if let Err((name, why)) = read_item(&mut set, item, item_kind.as_deref()) {
                        errors.push(err(name, format!("item {}: {why}", j + 1)));
                    }
                }
            }
            Err((name, why)) => errors.push(err(name, why)),
        }
    }
    (set, errors)
}

/// A list's items, and the kind they take when they name none.
type ListItems = (Vec<serde_yaml::Value>, Option<String>);

/// Why an object was not read: its `Kind name` when it has them, and the
/// reason.
type ObjectError = (Option<String>, String);

/// Adds a Service or EndpointSlice to `set` (another kind is passed over);
/// a list's items are handed back, to be read one by one.
fn read_object(
    set: &mut ManifestSet,
    fields: ManifestFields,
) -> Result<Option<ListItems>, ObjectError> {
    let Some(kind) = fields.kind.clone().filter(|k| !k.is_empty()) else {
        let name = fields.name().map(|n| format!(" {n}"));
        return Err((name, "document has no kind".into()));
    };
    let name = fields.name().map(|n| format!("{kind} {n}"));
    match fields.into_manifest() {
        Ok(Manifest::Service(s)) => set.services.push(ServiceInfo::from(s.0)),
        Ok(Manifest::Slice(s)) => set.slices.push(SliceInfo::from(s)),
        Ok(Manifest::List { items, item_kind }) => return Ok(Some((items, item_kind))),
        Ok(Manifest::Other) => {}
        Err(e) => return Err((name, e.to_string())),
    }
    Ok(None)
}

/// Adds one item of a list (a list in a list is not read).
fn read_item(
    set: &mut ManifestSet,
    item: serde_yaml::Value,
    item_kind: Option<&str>,
) -> Result<(), ObjectError> {
    let (kind, name) = kind_and_name(&item);
    let kind = (kind.filter(|k| !k.is_empty()).or(item_kind))
        .unwrap_or_default()
        .to_owned();
    let label = name.map(|n| format!("{kind} {n}"));
    let fields = match ManifestFields::of_item(item, item_kind) {
        Ok(fields) => fields,
        // As for a document: another kind's fields are not this agent's.
        Err(e) if matches!(kind.as_str(), "Service" | "EndpointSlice") => {
            return Err((label, e.to_string()))
        }
        Err(_) => return Ok(()),
    };
    match read_object(set, fields)? {
        None => Ok(()),
        Some(_) => Err((label, "a list inside a list is not read".into())),
    }
}

/// The `kind` and `metadata.name` of a document read as plain YAML.
fn kind_and_name(value: &serde_yaml::Value) -> (Option<&str>, Option<&str>) {
    let kind = value.get("kind").and_then(|k| k.as_str());
    let name = (value.get("metadata"))
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str());
    (kind, name)
}

/// What a document that did not read as a Service or EndpointSlice is.
enum Unreadable {
    /// Empty, or of a kind this agent does not read.
    Ignored,
    /// A Service or EndpointSlice (`Kind name`, when it has one) whose
    /// fields are not what its kind says.
    Object(Option<String>, String),
    /// Not YAML: the stream ends here.
    Stream(String),
}

/// Document `index` of `text` read again as plain YAML, to tell an empty
/// document, another kind's fields and a syntax error apart (`error`: why
/// the one-pass read failed). Only on failures: it reads the file again.
fn unreadable_document(text: &str, index: usize, error: serde_yaml::Error) -> Unreadable {
    let doc = serde_yaml::Deserializer::from_str(text).nth(index);
    let value = match doc.map(serde_yaml::Value::deserialize) {
        Some(Ok(v)) => v,
        Some(Err(e)) => return Unreadable::Stream(e.to_string()),
        None => return Unreadable::Stream(error.to_string()),
    };
    if value.is_null() {
        return Unreadable::Ignored;
    }
    let (kind, name) = kind_and_name(&value);
    match kind.unwrap_or("") {
        kind @ ("Service" | "EndpointSlice") => {
            Unreadable::Object(name.map(|n| format!("{kind} {n}")), error.to_string())
        }
        "" => Unreadable::Object(name.map(|n| format!(" {n}")), "document has no kind".into()),
        _ => Unreadable::Ignored,
    }
}

/// Reads a folder of manifests, remembering the last good content per file.
pub struct ManifestSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    fingerprint: Vec<(PathBuf, SystemTime, u64)>,
}

/// What one file held the last time it parsed, and what its last read
/// reported.
struct FileState {
    /// Modification time and size when it was last read (None: its last
    /// read failed, so it is read again).
    stamp: Option<(SystemTime, u64)>,
    objects: ManifestSet,
    errors: Vec<ManifestError>,
}

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            fingerprint: Vec::new(),
        }
    }

    /// The folder read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn files(&self) -> std::io::Result<Vec<PathBuf>> {
        use std::os::unix::fs::MetadataExt;
        let mut files = Vec::new();
        let mut stack = vec![self.dir.clone()];
        // Symlinks are followed (a ConfigMap volume's files are links), so
        // a directory may be reached twice, or in a loop: it is read once.
        let mut seen = std::collections::HashSet::new();
        while let Some(dir) = stack.pop() {
            let meta = fs::metadata(&dir)?;
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            for entry in fs::read_dir(&dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                ) {
                    files.push(path);
                }
            }
        }
        files.sort();
        Ok(files)
    }

    /// True when a file was added, removed or modified since the last read.
    pub fn changed(&self) -> bool {
        self.current_fingerprint()
            .map_or(true, |f| f != self.fingerprint)
    }

    fn current_fingerprint(&self) -> std::io::Result<Vec<(PathBuf, SystemTime, u64)>> {
        let mut out = Vec::new();
        for f in self.files()? {
            let m = fs::metadata(&f)?;
            out.push((f, m.modified()?, m.len()));
        }
        Ok(out)
    }

    /// Reads the folder: every file when `all`, else the files added or
    /// modified since the last read (by modification time and size; the
    /// others keep their objects without being parsed again). A file with
    /// errors contributes its last good content (or, on its first read,
    /// the documents that did parse). Returns every file's errors, also
    /// those of files not read again.
    pub fn read(&mut self, all: bool) -> Vec<ManifestError> {
        let files = match self.files() {
            Ok(f) => f,
            Err(e) => {
                // Keep serving what we had.
                return vec![ManifestError {
                    file: self.dir.clone(),
                    document: 0,
                    object: None,
                    reason: e.to_string(),
                }];
            }
        };
        self.fingerprint = self.current_fingerprint().unwrap_or_default();
        let mut previous = std::mem::take(&mut self.files);
        for file in files {
            let stamp = fs::metadata(&file)
                .and_then(|m| Ok((m.modified()?, m.len())))
                .ok();
            let state = match previous.remove(&file) {
                Some(state) if !all && stamp.is_some() && state.stamp == stamp => state,
                prev => read_file(&file, stamp, prev),
            };
            self.files.insert(file, state);
        }
        self.errors()
    }

    fn errors(&self) -> Vec<ManifestError> {
        self.files
            .values()
            .flat_map(|f| f.errors.iter().cloned())
            .collect()
    }

    /// Every Service the files hold.
    pub fn services(&self) -> Vec<&ServiceInfo> {
        self.files
            .values()
            .flat_map(|f| &f.objects.services)
            .collect()
    }

    /// Every EndpointSlice the files hold.
    pub fn slices(&self) -> Vec<&SliceInfo> {
        self.files
            .values()
            .flat_map(|f| &f.objects.slices)
            .collect()
    }
}

/// Reads and parses `file`; on errors it keeps `prev`'s objects.
fn read_file(file: &Path, stamp: Option<(SystemTime, u64)>, prev: Option<FileState>) -> FileState {
    let (objects, errors) = match fs::read_to_string(file) {
        Ok(text) => parse_documents(file, &text),
        Err(e) => {
            let error = ManifestError {
                file: file.to_path_buf(),
                document: 0,
                object: None,
                reason: e.to_string(),
            };
            return FileState {
                stamp: None,
                objects: prev.map(|p| p.objects).unwrap_or_default(),
                errors: vec![error],
            };
        }
    };
    let objects = match prev {
        Some(prev) if !errors.is_empty() => prev.objects,
        _ => objects,
    };
    FileState {
        stamp,
        objects,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.2]}]
ports: [{port: 80}]
";

    #[test]
    fn multi_document_files_yield_services_and_slices_only() {
        let (set, errors) = parse_documents(Path::new("a.yaml"), GOOD);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(set.services.len(), 1);
        assert_eq!(set.slices.len(), 1);
    }

    #[test]
    fn empty_documents_and_other_kinds_whatever_their_fields_are_skipped() {
        let text = "---\n---\nkind: Widget\nmetadata: {name: w}\nendpoints: 3\nports: x\n---\n\
                    kind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\n\
                    endpoints: [{addresses: [10.244.0.2], targetRef: {kind: Pod, name: p}}]\n";
        let (set, errors) = parse_documents(Path::new("w.yaml"), text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((set.services.len(), set.slices.len()), (0, 1));
    }

    #[test]
    fn a_malformed_slice_or_kindless_document_is_named_and_the_rest_read() {
        let text = "kind: EndpointSlice\nmetadata: {name: bad}\nendpoints: [{addresses: 7}]\n\
                    ---\nmetadata: {name: nokind}\n---\nkind: Service\nmetadata: {name: ok}\n\
                    spec: {clusterIP: 10.96.0.11}\n";
        let (set, errors) = parse_documents(Path::new("m.yaml"), text);
        assert_eq!(set.services.len(), 1);
        let named: Vec<_> = errors
            .iter()
            .map(|e| (e.document, e.object.clone()))
            .collect();
        assert_eq!(
            named,
            [
                (1, Some("EndpointSlice bad".into())),
                (2, Some(" nokind".into()))
            ]
        );
        assert_eq!(errors[1].reason, "document has no kind");
    }

    /// What `kubectl get services,endpointslices -o yaml` writes, and a
    /// typed list whose items do not name their kind.
    #[test]
    fn the_items_of_lists_are_read_as_documents() {
        let text = "apiVersion: v1\nkind: List\nmetadata: {resourceVersion: \"\"}\nitems:\n\
                    - {apiVersion: v1, kind: Service, metadata: {name: web},\n   \
                    spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}}\n\
                    - {kind: Deployment, metadata: {name: web}, spec: {replicas: 2}, ports: x}\n\
                    - {kind: EndpointSlice, metadata: {name: web-1}, addressType: IPv4,\n   \
                    endpoints: [{addresses: [10.244.0.2]}], ports: [{port: 80}]}\n\
                    - {kind: Service, metadata: {name: bad}, spec: {ports: [{port: eighty}]}}\n\
                    ---\nkind: ServiceList\nitems: [{metadata: {name: typed},\n\
                    spec: {clusterIP: 10.96.0.11}}]\n";
        let (set, errors) = parse_documents(Path::new("l.yaml"), text);
        let names: Vec<&str> = set.services.iter().map(|s| &*s.name.name).collect();
        assert_eq!(names, ["web", "typed"]);
        assert_eq!(set.slices.len(), 1);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].object.as_deref(), Some("Service bad"));
        assert!(
            errors[0].reason.starts_with("item 4: "),
            "{}",
            errors[0].reason
        );
    }

    #[test]
    fn a_syntax_error_ends_the_file() {
        let text = "kind: Service\nmetadata: {name: a}\n---\nkind: [unclosed\n---\n\
                    kind: Service\nmetadata: {name: b}\n";
        let (set, errors) = parse_documents(Path::new("s.yaml"), text);
        assert_eq!(set.services.len(), 1);
        assert_eq!((errors.len(), errors[0].document), (1, 2), "{errors:?}");
    }

    #[test]
    fn a_bad_document_is_reported_with_file_document_and_object() {
        let text = "kind: Service\napiVersion: v1\nmetadata: {name: broken}\nspec: {ports: [{port: eighty}]}\n---\nkind: Service\napiVersion: v1\nmetadata: {name: ok}\nspec: {clusterIP: 10.96.0.11}\n";
        let (set, errors) = parse_documents(Path::new("x.yaml"), text);
        assert_eq!(set.services.len(), 1);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].document, 1);
        assert_eq!(errors[0].object.as_deref(), Some("Service broken"));
        assert!(
            errors[0]
                .to_string()
                .starts_with("x.yaml document 1 (Service broken): "),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn a_file_that_breaks_keeps_its_last_good_objects() {
        let dir = std::env::temp_dir().join(format!("lb-manifests-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("web.yaml");
        fs::write(&file, GOOD).unwrap();
        fs::write(dir.join("other.yml"), "kind: Service\napiVersion: v1\nmetadata: {name: other}\nspec: {clusterIP: 10.96.0.12}\n").unwrap();
        let mut src = ManifestSource::new(&dir);
        let errors = src.read(true);
        assert!(errors.is_empty());
        assert_eq!(src.services().len(), 2);
        assert!(!src.changed());
        fs::write(&file, "kind: Service\n  bad: [indent").unwrap();
        assert!(src.changed());
        let errors = src.read(false);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].file, file);
        assert_eq!(
            src.services().len(),
            2,
            "last good content of web.yaml stays"
        );
        assert_eq!(src.slices().len(), 1);
        // Not read again while unchanged, and still reported.
        assert_eq!(src.read(false), errors);
        fs::remove_file(&file).unwrap();
        assert!(src.read(false).is_empty());
        assert_eq!(
            src.services().len(),
            1,
            "a removed file removes its objects"
        );
        fs::write(dir.join("other.yml"), "kind: Service\napiVersion: v1\nmetadata: {name: renamed}\nspec: {clusterIP: 10.96.0.12}\n").unwrap();
        assert!(src.read(false).is_empty());
        assert_eq!(
            &*src.services()[0].name.name,
            "renamed",
            "a modified file is read again"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_reached_again_through_a_symlink_is_read_once() {
        let dir = std::env::temp_dir().join(format!("lb-manifests-loop-{}", std::process::id()));
        let sub = dir.join("sub");
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join("web.yaml"), GOOD).unwrap();
        // A loop (as /proc and /sys have) and a second way in.
        std::os::unix::fs::symlink(&dir, sub.join("up")).unwrap();
        std::os::unix::fs::symlink(&sub, dir.join("again")).unwrap();
        let mut src = ManifestSource::new(&dir);
        assert!(src.read(true).is_empty());
        assert_eq!(src.services().len(), 1, "{:?}", src.files());
        fs::remove_dir_all(&dir).unwrap();
    }
}
