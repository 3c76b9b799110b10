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

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;

use crate::source::objects::{ServiceInfo, SliceInfo};

/// The objects of the folder, as translation reads them (the same form
/// the API source keeps).
#[derive(Clone, Debug, Default)]
pub struct ManifestSet {
    pub services: Vec<ServiceInfo>,
    pub slices: Vec<SliceInfo>,
}

impl ManifestSet {
    fn extend(&mut self, other: &ManifestSet) {
        self.services.extend(other.services.iter().cloned());
        self.slices.extend(other.slices.iter().cloned());
    }
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
        let document = i + 1;
        let err = |object: Option<String>, reason: String| ManifestError {
            file: file.to_owned(),
            document,
            object,
            reason,
        };
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(err(None, e.to_string()));
                // A syntax error leaves the rest of the stream unreadable.
                break;
            }
        };
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_owned();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .map(|n| format!("{kind} {n}"));
        match kind.as_str() {
            "Service" => match serde_yaml::from_value::<Service>(value) {
                Ok(s) => set.services.push(ServiceInfo::from(s)),
                Err(e) => errors.push(err(name, e.to_string())),
            },
            "EndpointSlice" => match serde_yaml::from_value::<EndpointSlice>(value) {
                Ok(s) => set.slices.push(SliceInfo::from(s)),
                Err(e) => errors.push(err(name, e.to_string())),
            },
            "" => errors.push(err(name, "document has no kind".into())),
            _ => {}
        }
    }
    (set, errors)
}

/// Reads a folder of manifests, remembering the last good content per file.
pub struct ManifestSource {
    dir: PathBuf,
    last_good: BTreeMap<PathBuf, ManifestSet>,
    fingerprint: Vec<(PathBuf, SystemTime, u64)>,
}

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            last_good: BTreeMap::new(),
            fingerprint: Vec::new(),
        }
    }

    fn files(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(dir) = stack.pop() {
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

    /// Reads all files. Files with errors contribute their last good content
    /// (or, on the first read, the documents that did parse).
    pub fn read(&mut self) -> (ManifestSet, Vec<ManifestError>) {
        let mut all = ManifestSet::default();
        let mut errors = Vec::new();
        let files = match self.files() {
            Ok(f) => f,
            Err(e) => {
                errors.push(ManifestError {
                    file: self.dir.clone(),
                    document: 0,
                    object: None,
                    reason: e.to_string(),
                });
                // Keep serving what we had.
                for set in self.last_good.values() {
                    all.extend(set);
                }
                return (all, errors);
            }
        };
        self.fingerprint = self.current_fingerprint().unwrap_or_default();
        let mut seen = BTreeMap::new();
        for file in files {
            let text = match fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(ManifestError {
                        file: file.clone(),
                        document: 0,
                        object: None,
                        reason: e.to_string(),
                    });
                    if let Some(prev) = self.last_good.get(&file) {
                        seen.insert(file, prev.clone());
                    }
                    continue;
                }
            };
            let (set, errs) = parse_documents(&file, &text);
            let effective = match (errs.is_empty(), self.last_good.get(&file)) {
                (false, Some(prev)) => prev.clone(),
                _ => set,
            };
            errors.extend(errs);
            seen.insert(file, effective);
        }
        for set in seen.values() {
            all.extend(set);
        }
        self.last_good = seen;
        (all, errors)
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
        let (set, errors) = src.read();
        assert!(errors.is_empty());
        assert_eq!(set.services.len(), 2);
        assert!(!src.changed());
        fs::write(&file, "kind: Service\n  bad: [indent").unwrap();
        assert!(src.changed());
        let (set, errors) = src.read();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].file, file);
        assert_eq!(set.services.len(), 2, "last good content of web.yaml stays");
        assert_eq!(set.slices.len(), 1);
        fs::remove_file(&file).unwrap();
        let (set, _) = src.read();
        assert_eq!(set.services.len(), 1, "a removed file removes its objects");
        fs::remove_dir_all(&dir).unwrap();
    }
}
