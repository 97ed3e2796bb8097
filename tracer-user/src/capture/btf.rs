//! Just enough of a BTF reader to find struct member offsets and tracepoints in the running
//! kernel's type information (/sys/kernel/btf/vmlinux).
//!
//! aya cannot relocate field accesses made from Rust, so the kernel programs read struct fields
//! at offsets computed here and passed in through their `CONFIG` global. The format is
//! documented in the kernel's Documentation/bpf/btf.rst.

use std::path::Path;

use thiserror::Error;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not BTF data: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("{strukt}.{member} is a bit field; its byte offset cannot be used")]
    BitField { strukt: String, member: String },
    #[error(
        "struct sock's {member} lies at byte {offset}, beyond the first {block} bytes that \
         tracer reads in one go; this kernel's layout is not supported yet"
    )]
    OutsideBlock {
        member: &'static str,
        offset: u32,
        block: u32,
    },
    #[error("{strukt}.{member} is not a struct or union, so it has no member {next}")]
    NotAggregate {
        strukt: String,
        member: String,
        next: String,
    },
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// A struct or union member, decoded when asked for.
#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

/// The kernel's types: the raw BTF and where each type starts. Names are found by scanning and
/// members decoded on demand (tracer asks a few dozen questions once, at start-up), so reading
/// vmlinux's BTF costs little more memory than the file itself, and nothing once dropped.
pub struct Btf {
    data: Vec<u8>,
    /// Where the type and string sections start in `data`.
    types_at: usize,
    strings_at: usize,
    strings_len: usize,
    /// The byte offset of every type in the type section, by id (id 0 is void).
    type_offsets: Vec<u32>,
}

fn le_u32(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Btf::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Btf::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        if data.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]])) != Some(MAGIC) {
            return Err(BtfError::Malformed("bad magic (or a big-endian BTF)"));
        }
        let hdr_len = le_u32(&data, 4)? as usize;
        let type_off = le_u32(&data, 8)? as usize;
        let type_len = le_u32(&data, 12)? as usize;
        let str_off = le_u32(&data, 16)? as usize;
        let str_len = le_u32(&data, 20)? as usize;
        let types_at = hdr_len + type_off;
        let strings_at = hdr_len + str_off;
        if data.len() < types_at + type_len || data.len() < strings_at + str_len {
            return Err(BtfError::Malformed("sections out of bounds"));
        }
        let mut btf = Btf {
            data,
            types_at,
            strings_at,
            strings_len: str_len,
            type_offsets: vec![0],
        };
        let mut at = 0;
        while at < type_len {
            btf.type_offsets.push(at as u32);
            let info = btf.word(at + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            at += 12
                + match kind {
                    KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                    KIND_ARRAY => 12,
                    KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                    KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                    // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
                    _ => 0,
                };
        }
        Ok(btf)
    }

    /// A u32 at `at` in the type section.
    fn word(&self, at: usize) -> Result<u32, BtfError> {
        le_u32(&self.data, self.types_at + at)
    }

    fn name(&self, offset: u32) -> Option<&str> {
        let strings = self
            .data
            .get(self.strings_at..self.strings_at + self.strings_len)?;
        let rest = strings.get(offset as usize..)?;
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).ok()
    }

    /// The first type of one of `kinds` named `name`.
    fn find(&self, name: &str, kinds: &[u32]) -> Option<u32> {
        (1..self.type_offsets.len() as u32).find(|id| {
            self.header(*id).is_some_and(|(kind, _, _, at)| {
                kinds.contains(&kind)
                    && self
                        .word(at)
                        .ok()
                        .and_then(|off| self.name(off))
                        .is_some_and(|n| n == name)
            })
        })
    }

    /// Kind, vlen and kind_flag of a type, and where its header starts in the type section.
    fn header(&self, id: u32) -> Option<(u32, usize, bool, usize)> {
        let at = *self.type_offsets.get(id as usize)? as usize;
        let info = self.word(at + 4).ok()?;
        Some((
            (info >> 24) & 0x1f,
            (info & 0xffff) as usize,
            info >> 31 == 1,
            at,
        ))
    }

    /// The type behind typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.header(id) {
                Some((
                    KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG,
                    _,
                    _,
                    at,
                )) => match self.word(at + 8) {
                    Ok(next) => id = next,
                    Err(_) => return 0,
                },
                _ => return id,
            }
        }
        0
    }

    /// The members of a struct or union, or `None` for another kind.
    fn members(&self, id: u32) -> Option<Vec<Member>> {
        let (kind, vlen, kind_flag, at) = self.header(id)?;
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return None;
        }
        (0..vlen)
            .map(|i| {
                let m = at + 12 + 12 * i;
                let offset = self.word(m + 8).ok()?;
                let (bit_offset, bitfield_size) = if kind_flag {
                    (offset & 0x00ff_ffff, offset >> 24)
                } else {
                    (offset, 0)
                };
                Some(Member {
                    name_off: self.word(m).ok()?,
                    type_id: self.word(m + 4).ok()?,
                    bit_offset,
                    bitfield_size,
                })
            })
            .collect()
    }

    /// How many types the BTF holds.
    pub fn len(&self) -> usize {
        self.type_offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.type_offsets.len() <= 1
    }

    /// Whether the kernel has the tracepoint `name` (it declares `btf_trace_<name>`).
    pub fn has_tracepoint(&self, name: &str) -> bool {
        self.find(&format!("btf_trace_{name}"), &[KIND_TYPEDEF])
            .is_some()
    }

    /// The byte offset of `path` (members separated by dots, e.g. `__sk_common.skc_family`)
    /// inside `struct strukt`. Members of anonymous structs and unions are found as the C
    /// compiler finds them.
    pub fn member_offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut type_id = self
            .find(strukt, &[KIND_STRUCT])
            .ok_or_else(|| BtfError::NoStruct(strukt.to_string()))?;
        let mut bits = 0u32;
        let mut parent = strukt.to_string();
        for member in path.split('.') {
            let Some(members) = self.members(self.resolve(type_id)) else {
                return Err(BtfError::NotAggregate {
                    strukt: strukt.to_string(),
                    member: parent,
                    next: member.to_string(),
                });
            };
            let found = self
                .find_member(&members, member)
                .ok_or_else(|| BtfError::NoMember {
                    strukt: strukt.to_string(),
                    member: path.to_string(),
                })?;
            if found.bitfield_size != 0 || found.bit_offset % 8 != 0 {
                return Err(BtfError::BitField {
                    strukt: strukt.to_string(),
                    member: path.to_string(),
                });
            }
            bits += found.bit_offset;
            type_id = found.type_id;
            parent = member.to_string();
        }
        Ok(bits / 8)
    }

    /// The value of `variant` of `enum name`.
    pub fn enum_value(&self, name: &str, variant: &str) -> Option<i64> {
        let (kind, vlen, kind_flag, at) =
            self.header(self.find(name, &[KIND_ENUM, KIND_ENUM64])?)?;
        let step = if kind == KIND_ENUM64 { 12 } else { 8 };
        (0..vlen).find_map(|i| {
            let v = at + 12 + step * i;
            if self.name(self.word(v).ok()?)? != variant {
                return None;
            }
            let low = self.word(v + 4).ok()?;
            Some(match kind {
                KIND_ENUM64 => (u64::from(low) | u64::from(self.word(v + 8).ok()?) << 32) as i64,
                _ if kind_flag => i64::from(low),
                _ => i64::from(low as i32),
            })
        })
    }

    /// `name` among `members`, or inside an anonymous struct or union member, with its offset
    /// made relative to `members`' aggregate.
    fn find_member(&self, members: &[Member], name: &str) -> Option<Member> {
        if let Some(member) = members.iter().find(|m| self.name(m.name_off) == Some(name)) {
            return Some(*member);
        }
        members
            .iter()
            .filter(|m| self.name(m.name_off).is_none_or(str::is_empty))
            .find_map(|anonymous| {
                let inner = self.members(self.resolve(anonymous.type_id))?;
                self.find_member(&inner, name).map(|mut found| {
                    found.bit_offset += anonymous.bit_offset;
                    found
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made BTF blob:
    /// `struct inner { int a; int b; }`
    /// `struct outer { int x; union { struct inner in; int y; }; const struct inner named; int bits:3; }`
    /// `enum colour { RED = 1, BLUE = -2 }`, `typedef int btf_trace_demo;`
    fn sample() -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut add = |s: &str| {
            let off = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let (int, inner, a, b, outer, x, in_, y, named, bits, colour, red, blue, tp) = (
            add("int"),
            add("inner"),
            add("a"),
            add("b"),
            add("outer"),
            add("x"),
            add("in"),
            add("y"),
            add("named"),
            add("bits"),
            add("colour"),
            add("RED"),
            add("BLUE"),
            add("btf_trace_demo"),
        );
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        let info = |kind: u32, vlen: u32, flag: bool| (kind << 24) | vlen | ((flag as u32) << 31);
        // 1: int
        push(&[int, info(KIND_INT, 0, false), 4, 32]);
        // 2: struct inner
        push(&[inner, info(KIND_STRUCT, 2, false), 8, a, 1, 0, b, 1, 32]);
        // 3: anonymous union { struct inner in; int y; }
        push(&[0, info(KIND_UNION, 2, false), 8, in_, 2, 0, y, 1, 0]);
        // 4: const struct inner
        push(&[0, info(KIND_CONST, 0, false), 2]);
        // 5: struct outer (kind_flag: member offsets carry bit-field sizes)
        push(&[
            outer,
            info(KIND_STRUCT, 4, true),
            24,
            x,
            1,
            0,
            0,
            3,
            64,
            named,
            4,
            128,
            bits,
            1,
            (3 << 24) | 192,
        ]);
        // 6: enum colour
        push(&[
            colour,
            info(KIND_ENUM, 2, false),
            4,
            red,
            1,
            blue,
            (-2i32) as u32,
        ]);
        // 7: typedef int btf_trace_demo
        push(&[tp, info(KIND_TYPEDEF, 0, false), 1]);

        let mut data = Vec::new();
        for w in [
            MAGIC as u32 | (1 << 16),
            24,
            0,
            types.len() as u32,
            types.len() as u32,
        ] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        data.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        data.extend_from_slice(&types);
        data.extend_from_slice(&strings);
        data
    }

    #[test]
    fn finds_members_directly_through_anonymous_unions_and_qualifiers() {
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(btf.member_offset("outer", "x").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "y").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "in.b").unwrap(), 12);
        assert_eq!(btf.member_offset("outer", "named.b").unwrap(), 20);
        assert_eq!(btf.member_offset("inner", "b").unwrap(), 4);
    }

    #[test]
    fn says_what_is_missing() {
        let btf = Btf::parse(sample()).unwrap();
        assert!(matches!(
            btf.member_offset("outer", "bits"),
            Err(BtfError::BitField { .. })
        ));
        assert!(matches!(
            btf.member_offset("outer", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("missing", "x"),
            Err(BtfError::NoStruct(_))
        ));
        assert!(matches!(
            btf.member_offset("outer", "x.y"),
            Err(BtfError::NotAggregate { .. })
        ));
        assert!(matches!(
            Btf::parse(b"nonsense data here, not btf".to_vec()),
            Err(BtfError::Malformed(_))
        ));
    }

    #[test]
    fn reads_enums_and_tracepoints() {
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(btf.enum_value("colour", "RED"), Some(1));
        assert_eq!(btf.enum_value("colour", "BLUE"), Some(-2));
        assert_eq!(btf.enum_value("colour", "GREEN"), None);
        assert!(btf.has_tracepoint("demo"));
        assert!(!btf.has_tracepoint("other"));
    }

    #[test]
    fn reads_the_running_kernel() {
        let Ok(btf) = Btf::from_sys_fs() else {
            crate::skip(&format!("this machine has no readable {VMLINUX}"));
            return;
        };
        assert!(btf.len() > 10_000);
        // A tcp_sock starts with its sock, which starts with its sock_common.
        assert_eq!(
            btf.member_offset("sock", "__sk_common.skc_daddr").unwrap(),
            0
        );
        let received = btf.member_offset("tcp_sock", "bytes_received").unwrap();
        assert!(received > btf.member_offset("sock", "sk_err").unwrap());
        assert!(btf.has_tracepoint("inet_sock_set_state"));
        assert_eq!(
            btf.enum_value("skb_drop_reason", "SKB_NOT_DROPPED_YET"),
            Some(0)
        );
    }
}
