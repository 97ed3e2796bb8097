//! Addresses as the kernel programs record them.

/// `AF_INET` from the kernel's socket.h.
pub const AF_INET: u16 = 2;
/// `AF_INET6` from the kernel's socket.h.
pub const AF_INET6: u16 = 10;
/// `AF_UNIX` from the kernel's socket.h.
pub const AF_UNIX: u16 = 1;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u16 = 6;
/// `SOCK_STREAM` and `SOCK_SEQPACKET`: the Unix socket types an upstream listens on.
pub const SOCK_STREAM: u16 = 1;
pub const SOCK_SEQPACKET: u16 = 5;
/// The size of `sockaddr_un.sun_path`.
pub const UNIX_PATH_MAX: usize = 108;

/// A Unix socket's path as connect() was given it, NUL-padded; an abstract socket's name
/// starts with a NUL byte and runs to the address length.
pub type UnixPath = [u8; UNIX_PATH_MAX];

/// The key a Unix socket path is known by in the kernel's maps: 64-bit FNV-1a over all
/// [`UNIX_PATH_MAX`] bytes (the padding included, so the loop has a fixed length).
pub fn unix_path_key(path: &UnixPath) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < UNIX_PATH_MAX {
        hash ^= path[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// One end of a connection: an IPv4 address in the first 4 bytes of `addr` (family
/// [`AF_INET`]), a full IPv6 address (family [`AF_INET6`], v4-mapped addresses included), or a
/// Unix socket (family [`AF_UNIX`]): its path's [`unix_path_key`] in the first 8 bytes, the
/// path itself in the `UNIX_PATHS` map. `port` is in host byte order.
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

    /// A Unix socket, by its path's key.
    pub const fn unix(key: u64) -> Self {
        let k = key.to_ne_bytes();
        Self {
            addr: [
                k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7], 0, 0, 0, 0, 0, 0, 0, 0,
            ],
            port: 0,
            family: AF_UNIX,
            _pad: [0; 4],
        }
    }

    /// The path key of a Unix socket endpoint.
    pub const fn unix_key(&self) -> u64 {
        let a = self.addr;
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_path_keys_tell_paths_apart_and_round_trip_through_endpoints() {
        let mut a = [0u8; UNIX_PATH_MAX];
        a[..22].copy_from_slice(b"/run/php/php-fpm.sock\0");
        let mut b = a;
        b[10] = b'X';
        assert_ne!(unix_path_key(&a), unix_path_key(&b));
        // FNV-1a over all 108 bytes, computed apart (Python): the kernel and the agent must agree
        // on every path's key, so the function must not drift.
        assert_eq!(unix_path_key(&a), 0xe755_0b44_5892_1951);
        // Every byte counts, the zeros after the path's end too (which is why the kernel zeroes
        // what follows a filesystem path's NUL before it takes the key).
        let mut c = a;
        c[UNIX_PATH_MAX - 1] = 1;
        assert_ne!(unix_path_key(&a), unix_path_key(&c));
        let endpoint = Endpoint::unix(unix_path_key(&a));
        assert_eq!(endpoint.family, AF_UNIX);
        assert_eq!(endpoint.unix_key(), unix_path_key(&a));
    }
}
