//! Just enough of a BTF reader to find struct member offsets and tracepoints in the running
//! kernel's type information (/sys/kernel/btf/vmlinux).
//!
//! aya cannot relocate field accesses made from Rust, so the kernel programs read struct fields
//! at offsets computed here and passed in through their `CONFIG` global. The format is
//! documented in the kernel's Documentation/bpf/btf.rst.

use std::{collections::HashMap, path::Path};

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

#[derive(Debug, Clone)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

#[derive(Debug, Clone)]
enum Type {
    /// struct or union
    Aggregate {
        members: Vec<Member>,
    },
    /// typedef, const, volatile, restrict, type tag: stands for `type_id`.
    Alias {
        type_id: u32,
    },
    Enum {
        variants: Vec<(String, i64)>,
    },
    Other,
}

/// The kernel's types, by id, with the names of structs, enums and typedefs indexed.
pub struct Btf {
    types: Vec<Type>,
    structs: HashMap<String, u32>,
    enums: HashMap<String, u32>,
    typedefs: HashMap<String, u32>,
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
        Btf::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        let u16_at = |at: usize| -> Result<u16, BtfError> {
            data.get(at..at + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .ok_or(BtfError::Malformed("truncated header"))
        };
        let u32_at = |at: usize| -> Result<u32, BtfError> {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(BtfError::Malformed("truncated header"))
        };
        if u16_at(0)? != MAGIC {
            return Err(BtfError::Malformed("bad magic (or a big-endian BTF)"));
        }
        let hdr_len = u32_at(4)? as usize;
        let type_off = u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        let types_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?;
        let name = |off: u32| -> String {
            let rest = strings.get(off as usize..).unwrap_or_default();
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end]).into_owned()
        };

        let mut btf = Btf {
            // Type id 0 is void.
            types: vec![Type::Other],
            structs: HashMap::new(),
            enums: HashMap::new(),
            typedefs: HashMap::new(),
        };
        let word = |at: usize| -> Result<u32, BtfError> {
            types_data
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(BtfError::Malformed("truncated type"))
        };
        let mut at = 0;
        while at < types_data.len() {
            let name_off = word(at)?;
            let info = word(at + 4)?;
            let size_or_type = word(at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let id = btf.types.len() as u32;
            let ty = match kind {
                KIND_INT => {
                    at += 4;
                    Type::Other
                }
                KIND_ARRAY => {
                    at += 12;
                    Type::Other
                }
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        let offset = word(at + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (offset & 0x00ff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        members.push(Member {
                            name: name(word(at)?),
                            type_id: word(at + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                        at += 12;
                    }
                    if name_off != 0 && kind == KIND_STRUCT {
                        btf.structs.entry(name(name_off)).or_insert(id);
                    }
                    Type::Aggregate { members }
                }
                KIND_ENUM => {
                    let mut variants = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        let value = word(at + 4)?;
                        let value = if kind_flag {
                            i64::from(value)
                        } else {
                            i64::from(value as i32)
                        };
                        variants.push((name(word(at)?), value));
                        at += 8;
                    }
                    if name_off != 0 {
                        btf.enums.entry(name(name_off)).or_insert(id);
                    }
                    Type::Enum { variants }
                }
                KIND_ENUM64 => {
                    let mut variants = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        let value = u64::from(word(at + 4)?) | (u64::from(word(at + 8)?) << 32);
                        variants.push((name(word(at)?), value as i64));
                        at += 12;
                    }
                    if name_off != 0 {
                        btf.enums.entry(name(name_off)).or_insert(id);
                    }
                    Type::Enum { variants }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    if kind == KIND_TYPEDEF && name_off != 0 {
                        btf.typedefs.entry(name(name_off)).or_insert(id);
                    }
                    Type::Alias {
                        type_id: size_or_type,
                    }
                }
                KIND_FUNC_PROTO => {
                    at += 8 * vlen;
                    Type::Other
                }
                KIND_VAR | KIND_DECL_TAG => {
                    at += 4;
                    Type::Other
                }
                KIND_DATASEC => {
                    at += 12 * vlen;
                    Type::Other
                }
                // PTR, FWD, FUNC, FLOAT: nothing follows the common header.
                _ => Type::Other,
            };
            btf.types.push(ty);
        }
        Ok(btf)
    }

    /// How many types the BTF holds.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    pub fn is_empty(&self) -> bool {
        self.types.len() <= 1
    }

    /// Whether the kernel has the tracepoint `name` (it declares `btf_trace_<name>`).
    pub fn has_tracepoint(&self, name: &str) -> bool {
        self.typedefs.contains_key(&format!("btf_trace_{name}"))
    }

    /// The byte offset of `path` (members separated by dots, e.g. `__sk_common.skc_family`)
    /// inside `struct strukt`. Members of anonymous structs and unions are found as the C
    /// compiler finds them.
    pub fn member_offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut type_id = *self
            .structs
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_string()))?;
        let mut bits = 0u32;
        let mut parent = strukt.to_string();
        for member in path.split('.') {
            let Type::Aggregate { members } = self.resolve(type_id) else {
                return Err(BtfError::NotAggregate {
                    strukt: strukt.to_string(),
                    member: parent,
                    next: member.to_string(),
                });
            };
            let found = self
                .find_member(members, member)
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
        let id = self.enums.get(name)?;
        match &self.types[*id as usize] {
            Type::Enum { variants } => variants.iter().find(|(n, _)| n == variant).map(|(_, v)| *v),
            _ => None,
        }
    }

    /// `name` among `members`, or inside an anonymous struct or union member, with its offset
    /// made relative to `members`' aggregate.
    fn find_member(&self, members: &[Member], name: &str) -> Option<Member> {
        if let Some(member) = members.iter().find(|m| m.name == name) {
            return Some(member.clone());
        }
        members
            .iter()
            .filter(|m| m.name.is_empty())
            .find_map(|anonymous| match self.resolve(anonymous.type_id) {
                Type::Aggregate { members } => self.find_member(members, name).map(|mut inner| {
                    inner.bit_offset += anonymous.bit_offset;
                    inner
                }),
                _ => None,
            })
    }

    /// The type behind typedefs and qualifiers.
    fn resolve(&self, mut type_id: u32) -> &Type {
        for _ in 0..32 {
            match self.types.get(type_id as usize) {
                Some(Type::Alias { type_id: next }) => type_id = *next,
                Some(ty) => return ty,
                None => return &Type::Other,
            }
        }
        &Type::Other
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
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("outer", "x").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "y").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "in.b").unwrap(), 12);
        assert_eq!(btf.member_offset("outer", "named.b").unwrap(), 20);
        assert_eq!(btf.member_offset("inner", "b").unwrap(), 4);
    }

    #[test]
    fn says_what_is_missing() {
        let btf = Btf::parse(&sample()).unwrap();
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
            Btf::parse(b"nonsense data here, not btf"),
            Err(BtfError::Malformed(_))
        ));
    }

    #[test]
    fn reads_enums_and_tracepoints() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.enum_value("colour", "RED"), Some(1));
        assert_eq!(btf.enum_value("colour", "BLUE"), Some(-2));
        assert_eq!(btf.enum_value("colour", "GREEN"), None);
        assert!(btf.has_tracepoint("demo"));
        assert!(!btf.has_tracepoint("other"));
    }

    #[test]
    fn reads_the_running_kernel() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("skipped: no readable {VMLINUX} on this machine");
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
