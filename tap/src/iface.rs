//! Interface queries by name (no privilege needed) and interface name rules.

use crate::sys::{self, IFNAMSIZ};
use crate::Error;

/// Administrative and operational state of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// IFF_UP: the operator set the link up.
    pub up: bool,
    /// IFF_RUNNING: operationally up (for a tap: up and at least one queue attached).
    pub running: bool,
}

/// MTU of the interface `name` in the caller's network namespace (SIOCGIFMTU).
pub fn interface_mtu(name: &str) -> Result<u32, Error> {
    let ifr = query(name, libc::SIOCGIFMTU, "SIOCGIFMTU")?;
    // The kernel never reports a negative MTU.
    Ok(u32::try_from(ifr.int()).unwrap_or(0))
}

/// Link state of the interface `name` in the caller's network namespace (SIOCGIFFLAGS).
pub fn link_state(name: &str) -> Result<LinkState, Error> {
    let flags = query(name, libc::SIOCGIFFLAGS, "SIOCGIFFLAGS")?.flags();
    Ok(LinkState {
        up: flags & libc::IFF_UP != 0,
        running: flags & libc::IFF_RUNNING != 0,
    })
}

fn query(
    name: &str,
    request: libc::c_ulong,
    request_name: &'static str,
) -> Result<sys::IfReq, Error> {
    validate_name(name)?;
    let sock = sys::open_query_socket().map_err(Error::QuerySocket)?;
    sys::interface_ioctl(&sock, name, request).map_err(|source| Error::InterfaceQuery {
        name: name.to_owned(),
        request: request_name,
        source,
    })
}

/// Checks `name` against the kernel's rules for interface names (dev_valid_name): 1 to 15 bytes,
/// not `.` or `..`, no `/`, `:`, NUL or whitespace. A `%d` template for TUNSETIFF passes.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() >= IFNAMSIZ {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("reserved")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        Some("contains '/', ':', NUL or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_queries_need_no_privilege() {
        // Every network namespace has lo; its MTU is 65536 unless someone changed it.
        let mtu = interface_mtu("lo").unwrap();
        assert!(mtu >= 1280, "lo mtu {mtu}");
        // lo may be down in a fresh namespace; the query itself must work.
        link_state("lo").unwrap();
    }

    #[test]
    fn missing_interface_keeps_errno_and_name() {
        let err = interface_mtu("mqvmm-nonexist").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
        assert_eq!(
            err.to_string(),
            "SIOCGIFMTU on interface mqvmm-nonexist failed"
        );
        let err = link_state("mqvmm-nonexist").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
    }

    #[test]
    fn names_follow_kernel_rules() {
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "0123456789abcdef"] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
        for good in ["tap0", "mq-tap.1", "0123456789abcde", "tap%d"] {
            validate_name(good).unwrap();
        }
        assert!(matches!(
            interface_mtu("a/b"),
            Err(Error::InvalidName { .. })
        ));
    }
}
