//! Who may connect to a feed: the `allow` list of CIDR blocks (IPv4 and IPv6). Pure: no
//! sockets.

use std::net::IpAddr;

/// One CIDR block, e.g. `10.20.0.0/16` or `fd00::/8`. A bare address is a /32 (or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    /// The network address (host bits cleared).
    addr: IpAddr,
    /// Prefix length in bits.
    prefix: u8,
}

impl IpNet {
    /// Parse `ADDR/PREFIX` or a bare address; the error says what is wrong with the entry.
    pub fn parse(s: &str) -> Result<IpNet, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| {
            format!("'{s}' is not an address or CIDR block (e.g. \"10.20.0.0/16\", \"fd00::/8\", \"192.0.2.7\")")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(format!(
                        "'{s}': the prefix length must be a number from 0 to {max}"
                    ));
                }
            },
        };
        let net = IpNet { addr, prefix };
        if net.masked(addr) != addr {
            return Err(format!(
                "'{s}' has host bits set: did you mean \"{}/{prefix}\"?",
                net.masked(addr)
            ));
        }
        Ok(net)
    }

    fn masked(&self, a: IpAddr) -> IpAddr {
        match a {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                IpAddr::V4((bits & mask).into())
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                IpAddr::V6((bits & mask).into())
            }
        }
    }

    /// Whether `peer` is inside this block. An IPv4 peer seen on an IPv6 socket
    /// (`::ffff:10.20.1.2`) is matched as the IPv4 address it is.
    pub fn contains(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        peer.is_ipv4() == self.addr.is_ipv4() && self.masked(peer) == self.addr
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A feed's allow list; empty means every address may connect.
#[derive(Debug, Clone, Default)]
pub struct AllowList(Vec<IpNet>);

impl AllowList {
    /// Parse every entry; the first bad one is returned with its index.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowList, (usize, String)> {
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| IpNet::parse(e.as_ref()).map_err(|m| (i, m)))
            .collect::<Result<Vec<_>, _>>()
            .map(AllowList)
    }

    /// Whether `peer` may connect.
    pub fn permits(&self, peer: IpAddr) -> bool {
        self.0.is_empty() || self.0.iter().any(|n| n.contains(peer))
    }

    /// No list: everyone may connect.
    pub fn is_open(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_match_the_addresses_inside_them_and_no_others() {
        let cases = [
            ("10.20.0.0/16", "10.20.255.1", true),
            ("10.20.0.0/16", "10.21.0.1", false),
            ("127.0.0.3", "127.0.0.3", true),
            ("127.0.0.3", "127.0.0.2", false),
            ("0.0.0.0/0", "192.0.2.1", true),
            ("::1/128", "::1", true),
            ("fd00::/8", "fd12:3456::1", true),
            ("fd00::/8", "fe80::1", false),
            // An IPv4 sender on a dual-stack socket.
            ("10.20.0.0/16", "::ffff:10.20.3.4", true),
            // Families never match each other.
            ("0.0.0.0/0", "::1", false),
            ("::/0", "10.0.0.1", false),
        ];
        for (net, peer, want) in cases {
            assert_eq!(
                IpNet::parse(net).unwrap().contains(ip(peer)),
                want,
                "{net} contains {peer}"
            );
        }
    }

    #[test]
    fn bad_entries_are_refused_with_what_is_wrong() {
        for (entry, says) in [
            ("10.20.0.0/33", "0 to 32"),
            ("fd00::/129", "0 to 128"),
            ("10.20.1.0/16", "host bits"),
            ("pas.trust.nhs.uk", "not an address"),
            ("10.20.0.0/", "prefix length"),
            ("", "not an address"),
        ] {
            let e = IpNet::parse(entry).unwrap_err();
            assert!(e.contains(says), "{entry}: {e}");
        }
        let (i, _) = AllowList::parse(&["10.0.0.0/8", "nope"]).unwrap_err();
        assert_eq!(i, 1);
    }

    #[test]
    fn an_empty_list_permits_everyone() {
        assert!(AllowList::default().permits(ip("192.0.2.1")));
        let l = AllowList::parse(&["127.0.0.3"]).unwrap();
        assert!(l.permits(ip("127.0.0.3")) && !l.permits(ip("127.0.0.2")));
    }
}
