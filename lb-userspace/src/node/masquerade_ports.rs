//! The source ports masqueraded flows get (NodePort, externalIPs and
//! LoadBalancer traffic with externalTrafficPolicy Cluster, hairpin).
//!
//! A masquerade port must never be one the node itself may use toward the
//! same backend, so the ranges leave out the node's ephemeral ports
//! (`ip_local_port_range`), the ports it reserves for applications
//! (`ip_local_reserved_ports`) and the NodePort range (a reply to a port
//! there would be taken for new NodePort traffic). The data path hands the
//! ports out in turn per backend and keeps a closed flow's port for 2 MSL,
//! so the range's size divided by 120 s is the sustained rate of new
//! masqueraded connections one backend can take.

use std::{fmt, str::FromStr};

use lb_common::{SnatPorts, SNAT_PORT_RANGES_MAX};

/// An inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const fn new(first: u16, last: u16) -> Self {
        Self { first, last }
    }

    /// How many ports (a range holds at least one).
    pub(crate) fn port_count(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortRangeError {
    #[error("{0:?} is not a port or a range FIRST-LAST")]
    Syntax(String),
    #[error("range {0} ends before it starts")]
    Reversed(PortRange),
    #[error("port 0 cannot be a source port")]
    PortZero,
    #[error("masquerade ports {0} overlap {1} ({2}): the node's own connections could take the same tuples")]
    Clash(PortRange, PortRange, &'static str),
    #[error("no masquerade ports are left once the node's ephemeral and reserved ports and the NodePort range are taken out")]
    Empty,
    #[error("at most {max} masquerade port ranges, got {0}", max = SNAT_PORT_RANGES_MAX)]
    TooMany(usize),
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| PortRangeError::Syntax(s.to_owned()))
        };
        let range = if let Some((a, b)) = s.split_once('-') {
            PortRange::new(parse(a)?, parse(b)?)
        } else {
            let p = parse(s)?;
            PortRange::new(p, p)
        };
        if range.first > range.last {
            return Err(PortRangeError::Reversed(range));
        }
        if range.first == 0 {
            return Err(PortRangeError::PortZero);
        }
        Ok(range)
    }
}

/// Parses a comma separated list of ports and ranges (the format of
/// `ip_local_reserved_ports`); an empty string is no range.
pub fn parse_list(s: &str) -> Result<Vec<PortRange>, PortRangeError> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// What the node's own connections may use, and what else is excluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePorts {
    /// `net.ipv4.ip_local_port_range`.
    pub ephemeral: PortRange,
    /// `net.ipv4.ip_local_reserved_ports`.
    pub reserved: Vec<PortRange>,
    /// The API server's `--service-node-port-range`.
    pub node_port_range: PortRange,
}

/// Ports below this are left out of the default ranges (privileged ports,
/// where well-known services listen).
pub(crate) const DEFAULT_FIRST_PORT: u16 = 1024;

/// The default ranges: 1024-65535 without the node's ports, the largest
/// `SNAT_PORT_RANGES_MAX` pieces, in port order.
pub fn default_ranges(node: &NodePorts) -> Result<Vec<PortRange>, PortRangeError> {
    let mut excluded = node.reserved.clone();
    excluded.push(node.ephemeral);
    excluded.push(node.node_port_range);
    excluded.sort();
    let mut free = Vec::new();
    let mut next = u32::from(DEFAULT_FIRST_PORT);
    for r in &excluded {
        if u32::from(r.first) > next {
            free.push(PortRange::new(next as u16, r.first - 1));
        }
        next = next.max(u32::from(r.last) + 1);
    }
    if u16::try_from(next).is_ok() {
        free.push(PortRange::new(next as u16, u16::MAX));
    }
    free.sort_by_key(|r| std::cmp::Reverse(r.port_count()));
    free.truncate(SNAT_PORT_RANGES_MAX);
    free.sort();
    if free.is_empty() {
        return Err(PortRangeError::Empty);
    }
    Ok(free)
}

/// Checks ranges a user gave (`--masquerade-ports`) against the node's.
pub fn check_ranges(ranges: &[PortRange], node: &NodePorts) -> Result<(), PortRangeError> {
    if ranges.is_empty() {
        return Err(PortRangeError::Empty);
    }
    if ranges.len() > SNAT_PORT_RANGES_MAX {
        return Err(PortRangeError::TooMany(ranges.len()));
    }
    let mut taken: Vec<(PortRange, &'static str)> = vec![
        (node.ephemeral, "net.ipv4.ip_local_port_range"),
        (node.node_port_range, "the NodePort range"),
    ];
    taken.extend(
        node.reserved
            .iter()
            .map(|r| (*r, "net.ipv4.ip_local_reserved_ports")),
    );
    for r in ranges {
        if let Some((t, what)) = taken.iter().find(|(t, _)| t.overlaps(r)) {
            return Err(PortRangeError::Clash(*r, *t, what));
        }
    }
    Ok(())
}

/// The ranges as the programs' load-time global.
pub fn to_global(ranges: &[PortRange]) -> Result<SnatPorts, PortRangeError> {
    if ranges.len() > SNAT_PORT_RANGES_MAX {
        return Err(PortRangeError::TooMany(ranges.len()));
    }
    let mut g = SnatPorts::default();
    for (i, r) in ranges.iter().enumerate() {
        g.start[i] = r.first;
        // A range of all 65535 ports does not fit a u16 length; it cannot
        // occur once the ephemeral range is taken out.
        g.len[i] = u16::try_from(r.port_count()).unwrap_or(u16::MAX);
    }
    Ok(g)
}

/// Reads the node's ports from /proc/sys (of the caller's network namespace).
pub fn read_node_ports(node_port_range: PortRange) -> std::io::Result<NodePorts> {
    let read = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"));
    let invalid = |e: PortRangeError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let local = read("ip_local_port_range")?;
    let mut it = local.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(first)), Some(Ok(last))) = (it.next(), it.next()) else {
        return Err(invalid(PortRangeError::Syntax(local.trim().to_owned())));
    };
    let reserved = parse_list(read("ip_local_reserved_ports")?.trim()).map_err(invalid)?;
    Ok(NodePorts {
        ephemeral: PortRange::new(first.min(last), first.max(last)),
        reserved,
        node_port_range,
    })
}

/// Ports the ranges hold.
pub fn count(ranges: &[PortRange]) -> u32 {
    ranges.iter().map(PortRange::port_count).sum()
}

pub fn display(ranges: &[PortRange]) -> String {
    ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux_defaults() -> NodePorts {
        NodePorts {
            ephemeral: PortRange::new(32768, 60999),
            reserved: Vec::new(),
            node_port_range: PortRange::new(30000, 32767),
        }
    }

    #[test]
    fn defaults_go_around_the_ephemeral_and_nodeport_ranges() {
        let r = default_ranges(&linux_defaults()).unwrap();
        assert_eq!(
            r,
            vec![PortRange::new(1024, 29999), PortRange::new(61000, 65535)]
        );
        assert_eq!(count(&r), 28_976 + 4_536);
    }

    #[test]
    fn reserved_ports_are_left_out_and_only_the_largest_pieces_kept() {
        let mut node = linux_defaults();
        node.reserved = parse_list("2000-2100,8080,9000-9100,10250,20000").unwrap();
        let r = default_ranges(&node).unwrap();
        assert_eq!(r.len(), SNAT_PORT_RANGES_MAX);
        for reserved in &node.reserved {
            assert!(r.iter().all(|x| !x.overlaps(reserved)), "{r:?}");
        }
        assert!(r.contains(&PortRange::new(10251, 19999)), "{r:?}");
        assert!(r.contains(&PortRange::new(61000, 65535)), "{r:?}");
    }

    #[test]
    fn a_wide_ephemeral_range_leaves_what_is_left() {
        let mut node = linux_defaults();
        node.ephemeral = PortRange::new(1024, 65535);
        assert_eq!(default_ranges(&node), Err(PortRangeError::Empty));
        node.ephemeral = PortRange::new(40000, 65535);
        assert_eq!(
            default_ranges(&node).unwrap(),
            vec![PortRange::new(1024, 29999), PortRange::new(32768, 39999)]
        );
    }

    #[test]
    fn given_ranges_must_not_clash() {
        let node = linux_defaults();
        let ok = parse_list("20000-29999,61000-65535").unwrap();
        assert_eq!(check_ranges(&ok, &node), Ok(()));
        let bad = parse_list("50000-62000").unwrap();
        let err = check_ranges(&bad, &node).unwrap_err();
        assert!(matches!(
            err,
            PortRangeError::Clash(_, _, "net.ipv4.ip_local_port_range")
        ));
        let bad = parse_list("31000-31100").unwrap();
        assert!(matches!(
            check_ranges(&bad, &node),
            Err(PortRangeError::Clash(_, _, "the NodePort range"))
        ));
        let five = parse_list("1-2,3-4,5-6,7-8,9-10").unwrap();
        assert_eq!(check_ranges(&five, &node), Err(PortRangeError::TooMany(5)));
    }

    #[test]
    fn syntax() {
        assert_eq!("80".parse(), Ok(PortRange::new(80, 80)));
        assert_eq!(" 1-2 ".parse(), Ok(PortRange::new(1, 2)));
        assert!(matches!(
            "2-1".parse::<PortRange>(),
            Err(PortRangeError::Reversed(_))
        ));
        assert!(matches!(
            "x".parse::<PortRange>(),
            Err(PortRangeError::Syntax(_))
        ));
        assert_eq!("0-5".parse::<PortRange>(), Err(PortRangeError::PortZero));
        assert_eq!(parse_list("").unwrap(), vec![]);
    }

    #[test]
    fn the_global_maps_indices_to_the_ports() {
        let r = parse_list("1024-29999,61000-65535").unwrap();
        let g = to_global(&r).unwrap();
        assert_eq!(g.total(), count(&r));
        assert_eq!(g.port_at(0), 1024);
        assert_eq!(g.port_at(28_975), 29_999);
        assert_eq!(g.port_at(28_976), 61_000);
        assert_eq!(g.port_at(g.total() - 1), 65_535);
    }
}
