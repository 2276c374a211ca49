//! Just enough of a BTF reader to find where a field sits inside a kernel struct, so the
//! verdict program can read `struct tcp_sock` fields on this kernel without CO-RE support
//! from the Rust toolchain. The format is documented in Documentation/bpf/btf.rst.

use std::path::Path;

/// Where the running kernel publishes its own type information.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF {path}: {error} (is CONFIG_DEBUG_INFO_BTF enabled?)")]
    Read { path: String, error: std::io::Error },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel struct {strukt} has no field {field}")]
    NoField { strukt: String, field: String },
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// A parsed BTF blob: type records by id (id 0 is `void`) and the string table.
pub struct Btf {
    data: Vec<u8>,
    strings: (usize, usize),
    /// Byte offset of each type record, indexed by type id.
    types: Vec<usize>,
}

impl Btf {
    pub fn from_kernel() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|error| BtfError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let header = |i: usize| read_u32(&data, 4 + 4 * i).ok_or(BtfError::Malformed("header"));
        let hdr_len = header(0)? as usize;
        let (type_off, type_len) = (header(1)? as usize, header(2)? as usize);
        let (str_off, str_len) = (header(3)? as usize, header(4)? as usize);
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = (hdr_len + str_off, hdr_len + str_off + str_len);
        if types_end > data.len() || strings.1 > data.len() {
            return Err(BtfError::Malformed("sections past the end"));
        }
        let mut types = vec![0];
        let mut at = types_start;
        while at < types_end {
            types.push(at);
            let info = read_u32(&data, at + 4).ok_or(BtfError::Malformed("type record"))?;
            at += 12 + extra_len(info)?;
        }
        Ok(Self {
            data,
            strings,
            types,
        })
    }

    /// Byte offset of `field` in `struct strukt`, looking through anonymous members.
    pub fn member_offset(&self, strukt: &str, field: &str) -> Result<u32, BtfError> {
        let id = (1..self.types.len())
            .find(|&id| {
                let (name, info, _) = self.record(id);
                kind(info) == KIND_STRUCT && self.name(name) == Some(strukt)
            })
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        self.find_member(id, field)
            .ok_or_else(|| BtfError::NoField {
                strukt: strukt.to_owned(),
                field: field.to_owned(),
            })
    }

    fn find_member(&self, id: usize, field: &str) -> Option<u32> {
        let (_, info, _) = self.record(id);
        let start = self.types[id] + 12;
        for i in 0..vlen(info) {
            let m = start + 12 * i;
            let name = read_u32(&self.data, m)?;
            let member_type = read_u32(&self.data, m + 4)? as usize;
            let raw_offset = read_u32(&self.data, m + 8)?;
            // With kind_flag set, the top byte holds a bitfield size.
            let bits = if info >> 31 == 1 {
                raw_offset & 0x00ff_ffff
            } else {
                raw_offset
            };
            if name == 0 {
                let inner = self.resolve(member_type)?;
                let k = kind(self.record(inner).1);
                if (k == KIND_STRUCT || k == KIND_UNION)
                    && let Some(off) = self.find_member(inner, field)
                {
                    return Some(bits / 8 + off);
                }
            } else if self.name(name) == Some(field) {
                return (bits % 8 == 0).then_some(bits / 8);
            }
        }
        None
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn resolve(&self, mut id: usize) -> Option<usize> {
        for _ in 0..32 {
            if id == 0 || id >= self.types.len() {
                return None;
            }
            let (_, info, referenced) = self.record(id);
            match kind(info) {
                8..=11 | 18 => id = referenced as usize,
                _ => return Some(id),
            }
        }
        None
    }

    fn record(&self, id: usize) -> (u32, u32, u32) {
        let at = self.types[id];
        let word = |i: usize| read_u32(&self.data, at + 4 * i).unwrap_or(0);
        (word(0), word(1), word(2))
    }

    fn name(&self, offset: u32) -> Option<&str> {
        let start = self.strings.0 + offset as usize;
        let bytes = self.data.get(start..self.strings.1)?;
        let end = bytes.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&bytes[..end]).ok()
    }
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn kind(info: u32) -> u32 {
    (info >> 24) & 0x1f
}

fn vlen(info: u32) -> usize {
    (info & 0xffff) as usize
}

/// Size of the kind-specific data that follows a type record's 12-byte common part.
fn extra_len(info: u32) -> Result<usize, BtfError> {
    Ok(match kind(info) {
        1 => 4,                    // INT
        3 => 12,                   // ARRAY
        4 | 5 => 12 * vlen(info),  // STRUCT, UNION
        6 => 8 * vlen(info),       // ENUM
        13 => 8 * vlen(info),      // FUNC_PROTO
        14 => 4,                   // VAR
        15 => 12 * vlen(info),     // DATASEC
        17 => 4,                   // DECL_TAG
        19 => 12 * vlen(info),     // ENUM64
        2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        _ => return Err(BtfError::Malformed("unknown type kind")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tcp_sock_fields_on_this_kernel() {
        let Ok(btf) = Btf::from_kernel() else {
            panic!("{VMLINUX_BTF} must be readable on the machines this project supports");
        };
        let write_seq = btf.member_offset("tcp_sock", "write_seq").unwrap();
        let snd_una = btf.member_offset("tcp_sock", "snd_una").unwrap();
        let acked = btf.member_offset("tcp_sock", "bytes_acked").unwrap();
        // tcp_sock begins with inet_connection_sock, over a kilobyte on any kernel.
        assert!(write_seq > 1000 && snd_una > 1000 && acked > 1000);
        assert_ne!(write_seq, snd_una);
        assert!(matches!(
            btf.member_offset("tcp_sock", "no_such_field"),
            Err(BtfError::NoField { .. })
        ));
        assert!(matches!(
            btf.member_offset("no_such_struct", "x"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            Btf::parse(vec![0; 64]),
            Err(BtfError::Malformed(_))
        ));
        assert!(matches!(Btf::parse(vec![]), Err(BtfError::Malformed(_))));
    }
}
