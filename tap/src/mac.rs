//! Ethernet MAC addresses: the one parser and the one text form of a MAC in mqvmm.

use std::fmt;
use std::str::FromStr;

/// An Ethernet MAC address.
///
/// Written as six pairs of hex digits separated by colons, lower case (`52:54:00:12:34:56`).
/// Parsed from text ([`FromStr`]) it is an address a user gives a device: the same form in
/// either case, and a unicast address other than all zeroes, the only ones a device can use
/// as its own. Converted from bytes it is whatever the bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// The address's bytes, in wire order.
    pub const fn octets(self) -> [u8; 6] {
        self.0
    }

    /// Whether the address is a group address (the low bit of the first byte).
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// Whether the address is locally administered (the second-lowest bit of the first byte)
    /// rather than assigned by a vendor.
    pub const fn is_locally_administered(self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(octets: [u8; 6]) -> MacAddr {
        MacAddr(octets)
    }
}

impl From<MacAddr> for [u8; 6] {
    fn from(mac: MacAddr) -> [u8; 6] {
        mac.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Why a text is not a MAC address a device can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseMacError {
    /// Not six pairs of hex digits separated by colons.
    #[error(
        "{text:?} is not a MAC address: expected six pairs of hex digits separated by colons, \
         like 52:54:00:12:34:56"
    )]
    Format {
        /// The text given.
        text: String,
    },
    /// A group address: no device can have it as its own.
    #[error(
        "{mac} is a multicast address (the low bit of its first byte is set): give a unicast one"
    )]
    Multicast {
        /// The address given.
        mac: MacAddr,
    },
    /// All zeroes: not an address at all.
    #[error("00:00:00:00:00:00 is not a usable MAC address")]
    Zero,
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(text: &str) -> Result<MacAddr, ParseMacError> {
        let format = || ParseMacError::Format {
            text: text.to_owned(),
        };
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(format)?;
            // Exactly two digits: from_str_radix alone would also take "5" or "+5".
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| format())?;
        }
        if parts.next().is_some() {
            return Err(format());
        }
        let mac = MacAddr(octets);
        if mac.is_multicast() {
            return Err(ParseMacError::Multicast { mac });
        }
        if octets == [0; 6] {
            return Err(ParseMacError::Zero);
        }
        Ok(mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_either_case_and_prints_lower_case() {
        let mac: MacAddr = "52:54:00:AB:cd:EF".parse().unwrap();
        assert_eq!(mac.octets(), [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
    }

    #[test]
    fn converts_to_and_from_bytes() {
        let bytes = [0x02, 0x6d, 0x71, 0x76, 0x6d, 0x00];
        let mac = MacAddr::from(bytes);
        assert_eq!(<[u8; 6]>::from(mac), bytes);
        assert_eq!(mac.to_string(), "02:6d:71:76:6d:00");
        assert!(mac.is_locally_administered());
        assert!(!mac.is_multicast());
        // Bytes are taken as they are, group addresses included.
        let group = MacAddr::from([0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]);
        assert!(group.is_multicast());
        assert_eq!(group.to_string(), "01:00:5e:00:00:01");
    }

    #[test]
    fn anything_but_six_pairs_of_hex_digits_is_refused_with_the_text() {
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "52:54:00:ab:cd:ef:",
            "52-54-00-ab-cd-ef",
            "5:54:00:ab:cd:ef",
            "+5:54:00:ab:cd:ef",
            "052:54:00:ab:cd:e",
            "zz:54:00:ab:cd:ef",
            " 52:54:00:ab:cd:ef",
            "52:54:00:ab:cd:éf",
        ] {
            let err = bad.parse::<MacAddr>().unwrap_err();
            assert_eq!(
                err,
                ParseMacError::Format {
                    text: bad.to_owned()
                }
            );
            assert!(
                err.to_string()
                    .starts_with(&format!("{bad:?} is not a MAC address: expected six pairs")),
                "{err}"
            );
        }
    }

    #[test]
    fn group_and_all_zero_addresses_are_refused() {
        let err = "01:00:5E:00:00:01".parse::<MacAddr>().unwrap_err();
        assert!(matches!(err, ParseMacError::Multicast { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "01:00:5e:00:00:01 is a multicast address (the low bit of its first byte is set): \
             give a unicast one"
        );
        assert!("ff:ff:ff:ff:ff:ff".parse::<MacAddr>().is_err());
        assert_eq!(
            "00:00:00:00:00:00".parse::<MacAddr>(),
            Err(ParseMacError::Zero)
        );
        assert!("02:00:00:00:00:00".parse::<MacAddr>().is_ok());
    }
}
