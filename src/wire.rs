//! proxy-wasm's serialized header map, read in place. The filter fetches all
//! request headers with one host call instead of one call per name, and looks
//! them up here without copying: a header lookup costs no host call and no
//! allocation.
//!
//! Layout (little-endian): `u32 count`, then `count` × (`u32 name_len`,
//! `u32 value_len`), then each name and value followed by a NUL byte.

use crate::decide::Headers;

/// A header map, checked once by [`HeaderMap::parse`].
#[derive(Debug, Clone, Copy)]
pub struct HeaderMap<'a> {
    /// The (len, len) table.
    sizes: &'a [u8],
    /// Names and values with their NULs.
    data: &'a [u8],
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    let word: [u8; 4] = word.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(word)).ok()
}

impl<'a> HeaderMap<'a> {
    /// `None` when `bytes` is not a well-formed map. An empty buffer is the
    /// empty map (the host sends nothing for no headers).
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        if bytes.is_empty() {
            return Some(Self {
                sizes: &[],
                data: &[],
            });
        }
        let count = read_u32(bytes, 0)?;
        let table_end = count.checked_mul(8)?.checked_add(4)?;
        let sizes = bytes.get(4..table_end)?;
        let data = bytes.get(table_end..)?;
        let map = Self { sizes, data };
        // Walk once so that every later walk stays in bounds.
        let mut used = 0usize;
        for i in 0..count {
            let name = read_u32(sizes, i * 8)?;
            let value = read_u32(sizes, i * 8 + 4)?;
            used = used.checked_add(name)?.checked_add(value)?.checked_add(2)?;
        }
        (used == data.len()).then_some(map)
    }

    /// Every (name, value), in the host's order.
    pub fn pairs(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let (sizes, data) = (self.sizes, self.data);
        let mut at = 0usize;
        sizes.chunks_exact(8).map_while(move |lens| {
            let name_len = read_u32(lens, 0)?;
            let value_len = read_u32(lens, 4)?;
            let name = data.get(at..at + name_len)?;
            at += name_len + 1;
            let value = data.get(at..at + value_len)?;
            at += value_len + 1;
            Some((name, value))
        })
    }

    /// Every value of `name`, in order.
    pub fn values_of<'n>(self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + 'n
    where
        'a: 'n,
    {
        self.pairs()
            .filter(move |(n, _)| *n == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// The serialized form of `pairs` (what the host sends).
    pub fn encode<'p>(pairs: impl IntoIterator<Item = (&'p [u8], &'p [u8])>) -> Vec<u8> {
        let pairs: Vec<_> = pairs.into_iter().collect();
        let mut out = Vec::new();
        let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
        out.extend_from_slice(&len32(pairs.len()));
        for (name, value) in &pairs {
            out.extend_from_slice(&len32(name.len()));
            out.extend_from_slice(&len32(value.len()));
        }
        for (name, value) in &pairs {
            out.extend_from_slice(name);
            out.push(0);
            out.extend_from_slice(value);
            out.push(0);
        }
        out
    }
}

impl Headers for HeaderMap<'_> {
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.values_of(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(pairs: &[(&str, &str)]) -> Vec<u8> {
        HeaderMap::encode(pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn round_trip_and_lookup() {
        let bytes = encode(&[
            (":authority", "go:8080"),
            ("baggage", "a=1"),
            ("x-virtual-env", ""),
            ("baggage", "b=2"),
        ]);
        let map = HeaderMap::parse(&bytes).expect("well-formed");
        assert_eq!(map.pairs().count(), 4);
        let baggage: Vec<_> = map.values("baggage").collect();
        assert_eq!(baggage, [b"a=1".as_slice(), b"b=2".as_slice()]);
        assert_eq!(map.values("x-virtual-env").next(), Some(b"".as_slice()));
        assert_eq!(map.values("cookie").next(), None);
    }

    #[test]
    fn empty_buffer_is_empty_map() {
        let map = HeaderMap::parse(&[]).expect("empty");
        assert_eq!(map.pairs().count(), 0);
        let zero = encode(&[]);
        assert_eq!(HeaderMap::parse(&zero).map(|m| m.pairs().count()), Some(0));
    }

    #[test]
    fn non_utf8_values_are_kept_as_bytes() {
        let bytes = HeaderMap::encode([(b"x-virtual-env".as_slice(), b"\xffdev".as_slice())]);
        let map = HeaderMap::parse(&bytes).expect("well-formed");
        assert_eq!(
            map.values("x-virtual-env").next(),
            Some(b"\xffdev".as_slice())
        );
    }

    #[test]
    fn malformed_maps_are_refused() {
        let good = encode(&[("a", "b"), ("cc", "dd")]);
        // Every truncation, and one extra byte, is refused without panicking.
        for cut in 1..good.len() {
            assert!(HeaderMap::parse(&good[..cut]).is_none(), "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(HeaderMap::parse(&longer).is_none());
        // A count whose table overflows.
        assert!(HeaderMap::parse(&u32::MAX.to_le_bytes()).is_none());
        // Lengths that overflow when added.
        let mut huge = 1u32.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderMap::parse(&huge).is_none());
    }
}
