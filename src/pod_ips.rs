//! Endpoint mode's pod addresses of a service, per env: the largest part of
//! an endpoint-mode table (100k pairs × 2 pods is 200k addresses), so they
//! are held packed, 5 bytes per IPv4 and 17 per IPv6 address, in one buffer
//! per service, not as a `String` per address in a `Vec` per env (the VM's
//! peak memory at 100k pairs was over its 16 MiB budget with those).
//!
//! On the wire: a list per env of canonical IPv4 or IPv6 text, as
//! Kubernetes writes `status.podIPs`. A non-canonical address is refused
//! while parsing, so the `IP:PORT` text the filter writes is exactly the
//! address the companion saw.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::de::{DeserializeSeed, Deserializer, Error, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

use crate::limits::{MAX_ENDPOINTS, MAX_ENVS};

const TAG_V4: u8 = 4;
const TAG_V6: u8 = 6;

/// For each env of a service (same order as its `envs`), its pods' IPs.
/// One pointer when empty: every service of a cluster-mode table has one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvPodIps(Option<Box<Packed>>);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Packed {
    /// Every address, a tag byte ([`TAG_V4`], [`TAG_V6`]) then its octets.
    bytes: Vec<u8>,
    /// `ends[j]`: one past env `j`'s last byte in `bytes`.
    ends: Vec<u32>,
    /// Addresses, all envs together.
    count: usize,
}

impl EnvPodIps {
    /// From each env's canonical address texts; refuses text that is not a
    /// canonical IPv4 or IPv6 address, and more than [`MAX_ENDPOINTS`].
    pub fn try_new<E, S>(envs: E) -> Result<Self, String>
    where
        E: IntoIterator,
        E::Item: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = Self::default();
        for ips in envs {
            for ip in ips {
                out.push_addr(parse_canonical(ip.as_ref())?)?;
            }
            out.close_env()?;
        }
        out.shrink();
        Ok(out)
    }

    /// Envs listed.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |p| p.ends.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Addresses listed, all envs together.
    pub fn addr_count(&self) -> usize {
        self.0.as_ref().map_or(0, |p| p.count)
    }

    /// The `j`-th env's addresses.
    pub fn get(&self, j: usize) -> Option<Addrs<'_>> {
        let p = self.0.as_deref()?;
        let end = *p.ends.get(j)? as usize;
        let start = match j.checked_sub(1) {
            Some(prev) => *p.ends.get(prev)? as usize,
            None => 0,
        };
        p.bytes.get(start..end).map(Addrs)
    }

    /// Every env's addresses, in order.
    pub fn iter(&self) -> impl Iterator<Item = Addrs<'_>> {
        (0..self.len()).filter_map(|j| self.get(j))
    }

    fn push_addr(&mut self, addr: IpAddr) -> Result<(), String> {
        let p = self.0.get_or_insert_with(Box::default);
        if p.count == MAX_ENDPOINTS {
            return Err(format!(
                "more than {MAX_ENDPOINTS} endpoint addresses (limit)"
            ));
        }
        match addr {
            IpAddr::V4(v4) => {
                p.bytes.push(TAG_V4);
                p.bytes.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                p.bytes.push(TAG_V6);
                p.bytes.extend_from_slice(&v6.octets());
            }
        }
        p.count += 1;
        Ok(())
    }

    fn close_env(&mut self) -> Result<(), String> {
        let p = self.0.get_or_insert_with(Box::default);
        if p.ends.len() == MAX_ENVS {
            return Err(format!(
                "more than {MAX_ENVS} lists of endpoint addresses (limit)"
            ));
        }
        // At most MAX_ENDPOINTS × 17 bytes: far below u32::MAX.
        let end = u32::try_from(p.bytes.len()).map_err(|_| "too many addresses".to_string())?;
        p.ends.push(end);
        Ok(())
    }

    /// Gives back what the buffers grew past their contents (a table holds
    /// one per service: growth by doubling left ~30% unused).
    fn shrink(&mut self) {
        if let Some(p) = self.0.as_mut() {
            p.bytes.shrink_to_fit();
            p.ends.shrink_to_fit();
        }
    }
}

/// One env's addresses, decoded as they are walked.
#[derive(Debug, Clone, Default)]
pub struct Addrs<'a>(&'a [u8]);

impl Iterator for Addrs<'_> {
    type Item = IpAddr;

    fn next(&mut self) -> Option<IpAddr> {
        let (&tag, rest) = self.0.split_first()?;
        let (addr, rest) = match tag {
            TAG_V4 => {
                let (octets, rest) = rest.split_first_chunk::<4>()?;
                (IpAddr::V4(Ipv4Addr::from(*octets)), rest)
            }
            TAG_V6 => {
                let (octets, rest) = rest.split_first_chunk::<16>()?;
                (IpAddr::V6(Ipv6Addr::from(*octets)), rest)
            }
            _ => return None,
        };
        self.0 = rest;
        Some(addr)
    }
}

/// A canonical IPv4 (`10.0.0.1`) or IPv6 (`fd00::1`) address, checked
/// without allocating (this runs once per pod address of a table).
pub fn parse_canonical(text: &str) -> Result<IpAddr, String> {
    let addr: IpAddr = text
        .parse()
        .map_err(|_| format!("`{text}` is not an IPv4 or IPv6 address"))?;
    let mut canonical = AddrText::default();
    let _ = write!(canonical, "{addr}");
    if canonical.as_bytes() == text.as_bytes() {
        Ok(addr)
    } else {
        Err(format!("`{text}` is not canonical (write `{addr}`)"))
    }
}

/// `IP:PORT`, or `[IP]:PORT` for IPv6: a socket address as Envoy parses it.
pub fn write_socket_address(out: &mut impl fmt::Write, addr: &IpAddr, port: u16) -> fmt::Result {
    match addr {
        IpAddr::V4(v4) => write!(out, "{v4}:{port}"),
        IpAddr::V6(v6) => write!(out, "[{v6}]:{port}"),
    }
}

/// The length of `addr`'s canonical text.
pub fn text_len(addr: &IpAddr) -> usize {
    let mut text = AddrText::default();
    let _ = write!(text, "{addr}");
    text.len
}

/// Room for the longest address text (an IPv6 address with an embedded
/// IPv4 one is at most 45 bytes).
struct AddrText {
    buf: [u8; 48],
    len: usize,
}

impl Default for AddrText {
    fn default() -> Self {
        Self {
            buf: [0; 48],
            len: 0,
        }
    }
}

impl AddrText {
    fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

impl fmt::Write for AddrText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl Serialize for EnvPodIps {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut envs = s.serialize_seq(Some(self.len()))?;
        for ips in self.iter() {
            envs.serialize_element(&AddrList(ips))?;
        }
        envs.end()
    }
}

struct AddrList<'a>(Addrs<'a>);

impl Serialize for AddrList<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.clone().map(|a| a.to_string()))
    }
}

impl<'de> Deserialize<'de> for EnvPodIps {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(EnvsVisitor)
    }
}

struct EnvsVisitor;

impl<'de> Visitor<'de> for EnvsVisitor {
    type Value = EnvPodIps;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a list of at most {MAX_ENVS} lists of pod IPs (at most {MAX_ENDPOINTS} in all)"
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<EnvPodIps, A::Error> {
        let mut out = EnvPodIps::default();
        while seq.next_element_seed(OneEnv(&mut out))?.is_some() {
            out.close_env().map_err(A::Error::custom)?;
        }
        out.shrink();
        Ok(out)
    }
}

/// One env's list, appended to the flat addresses as it is read.
struct OneEnv<'a>(&'a mut EnvPodIps);

impl<'de> DeserializeSeed<'de> for OneEnv<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for OneEnv<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of pod IPs")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(addr) = seq.next_element_seed(Addr)? {
            self.0.push_addr(addr).map_err(A::Error::custom)?;
        }
        Ok(())
    }
}

/// One address, parsed from the text the parser hands over (borrowed where
/// it can: no `String` per address).
struct Addr;

impl<'de> DeserializeSeed<'de> for Addr {
    type Value = IpAddr;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<IpAddr, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Addr {
    type Value = IpAddr;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a canonical IPv4 or IPv6 address")
    }

    fn visit_str<E: Error>(self, text: &str) -> Result<IpAddr, E> {
        parse_canonical(text).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_lists_of_canonical_text() {
        let json = r#"[["10.0.0.1","10.0.0.10"],["fd00::1"],["10.0.0.2"]]"#;
        let ips: EnvPodIps = serde_json::from_str(json).unwrap();
        assert_eq!(ips.len(), 3);
        assert_eq!(ips.addr_count(), 4);
        let v4 = |t: &str| t.parse::<IpAddr>().unwrap();
        assert_eq!(
            ips.get(0).unwrap().collect::<Vec<_>>(),
            [v4("10.0.0.1"), v4("10.0.0.10")]
        );
        assert_eq!(ips.get(1).unwrap().collect::<Vec<_>>(), [v4("fd00::1")]);
        assert!(ips.get(3).is_none());
        assert_eq!(serde_json::to_string(&ips).unwrap(), json);
        let built = EnvPodIps::try_new([
            vec!["10.0.0.1", "10.0.0.10"],
            vec!["fd00::1"],
            vec!["10.0.0.2"],
        ])
        .unwrap();
        assert_eq!(built, ips);
    }

    #[test]
    fn an_empty_env_list_is_kept_for_compile_to_refuse() {
        let ips: EnvPodIps = serde_json::from_str(r#"[[],["10.0.0.1"]]"#).unwrap();
        assert_eq!(ips.len(), 2);
        assert_eq!(ips.get(0).unwrap().count(), 0);
        assert_eq!(ips.get(1).unwrap().count(), 1);
    }

    #[test]
    fn refuses_what_is_not_a_canonical_address() {
        for (text, why) in [
            ("010.0.0.1", "not an IPv4 or IPv6 address"),
            ("10.0.0.1:80", "not an IPv4 or IPv6 address"),
            ("pod-a", "not an IPv4 or IPv6 address"),
            ("", "not an IPv4 or IPv6 address"),
            ("FD00::1", "not canonical (write `fd00::1`)"),
            ("fd00:0::1", "not canonical (write `fd00::1`)"),
            ("::ffff:10.0.0.1", "ok"),
        ] {
            let got = parse_canonical(text);
            match why {
                "ok" => assert!(got.is_ok(), "{text}: {got:?}"),
                _ => assert!(
                    got.as_ref().is_err_and(|e| e.contains(why)),
                    "{text}: {got:?}"
                ),
            }
            let json = format!(r#"[["{text}"]]"#);
            assert_eq!(
                serde_json::from_str::<EnvPodIps>(&json).is_ok(),
                why == "ok",
                "{json}"
            );
        }
        assert!(serde_json::from_str::<EnvPodIps>(r#"[[1]]"#).is_err());
        assert!(serde_json::from_str::<EnvPodIps>(r#"["10.0.0.1"]"#).is_err());
    }

    #[test]
    fn stops_at_the_address_limit_before_growing_past_it() {
        let mut ips = EnvPodIps::default();
        for _ in 0..MAX_ENDPOINTS {
            ips.push_addr(IpAddr::from([10, 0, 0, 1])).unwrap();
        }
        assert!(ips.push_addr(IpAddr::from([10, 0, 0, 1])).is_err());
        assert_eq!(ips.addr_count(), MAX_ENDPOINTS);
        assert_eq!(ips.0.as_ref().unwrap().bytes.len(), MAX_ENDPOINTS * 5);
    }
}
