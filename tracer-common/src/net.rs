//! Addresses as the kernel programs record them.

/// `AF_INET` from the kernel's socket.h.
pub const AF_INET: u16 = 2;
/// `AF_INET6` from the kernel's socket.h.
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u16 = 6;

/// One end of a TCP connection: an IPv4 address in the first 4 bytes of `addr` (family
/// [`AF_INET`]) or a full IPv6 address (family [`AF_INET6`], v4-mapped addresses included).
/// `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub _pad: [u8; 4],
}

impl Endpoint {
    pub const fn v4(addr: [u8; 4], port: u16) -> Self {
        Self {
            addr: [
                addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
            port,
            family: AF_INET,
            _pad: [0; 4],
        }
    }

    pub const fn v6(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            family: AF_INET6,
            _pad: [0; 4],
        }
    }
}
