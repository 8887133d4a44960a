//! The two CRCs of ext4 metadata and the JBD2 journal, as raw updates (no
//! inversion before or after: callers start from `!0` as the journal code
//! does).
//!
//! - CRC32C (Castagnoli, bit-reflected), for checksum v2/v3 and the journal
//!   superblock: what e2fsprogs calls `ext2fs_crc32c_le`.
//! - CRC32 (IEEE polynomial, not reflected), for the old
//!   `JBD2_FEATURE_COMPAT_CHECKSUM` commit checksum: `crc32_be`.

const CRC32C_POLY_REFLECTED: u32 = 0x82f6_3b78;
const CRC32_POLY: u32 = 0x04c1_1db7;

/// Eight tables for the slice-by-8 CRC32C: `[0]` is the usual byte table,
/// `[k][b]` the CRC of byte `b` followed by `k` zero bytes.
const fn crc32c_tables() -> [[u32; 256]; 8] {
    let mut tables = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ CRC32C_POLY_REFLECTED
            } else {
                crc >> 1
            };
            bit += 1;
        }
        tables[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[k - 1][i];
            tables[k][i] = (prev >> 8) ^ tables[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    tables
}

const fn crc32_be_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u32) << 24;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ CRC32_POLY
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static CRC32C: [[u32; 256]; 8] = crc32c_tables();
static CRC32_BE: [u32; 256] = crc32_be_table();

/// Continues a CRC32C over `bytes`.  Metadata checksums cover whole
/// blocks (every extent leaf written, every journal block logged), so this
/// uses the processor's CRC32C instruction where it has one.
pub fn crc32c(crc: u32, bytes: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the processor was just found to have SSE4.2.
            return unsafe { crc32c_sse42(crc, bytes) };
        }
    }
    crc32c_sliced(crc, bytes)
}

/// CRC32C with the SSE4.2 instruction, eight bytes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
// rustc before 1.87 (Debian 13 has 1.85) counts the intrinsics as unsafe to
// call even here; later ones as safe, and call the blocks unused.
#[allow(unused_unsafe)]
unsafe fn crc32c_sse42(crc: u32, bytes: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut words = bytes.chunks_exact(8);
    let mut crc = u64::from(crc);
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        // SAFETY: SSE4.2 is enabled for this function, and its caller checked
        // that the processor has it.
        crc = unsafe { _mm_crc32_u64(crc, word) };
    }
    let mut crc = crc as u32;
    for &b in words.remainder() {
        // SAFETY: as above.
        crc = unsafe { _mm_crc32_u8(crc, b) };
    }
    crc
}

/// CRC32C in plain Rust, eight bytes at a time through eight tables.
fn crc32c_sliced(mut crc: u32, bytes: &[u8]) -> u32 {
    let t = &CRC32C;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let lo = crc ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][usize::from(w[4])]
            ^ t[2][usize::from(w[5])]
            ^ t[1][usize::from(w[6])]
            ^ t[0][usize::from(w[7])];
    }
    for &b in words.remainder() {
        crc = t[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// Continues a big-endian (non-reflected) CRC32 over `bytes`.
pub fn crc32_be(mut crc: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        crc = CRC32_BE[(((crc >> 24) ^ u32::from(b)) & 0xff) as usize] ^ (crc << 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // CRC-32C of "123456789" with the usual pre- and post-inversion.
        assert_eq!(!crc32c(!0, b"123456789"), 0xe306_9283);
    }

    #[test]
    fn every_crc32c_way_agrees_at_every_length_and_alignment() {
        let mut rng = crate::testing::Rng::new(7);
        let data: Vec<u8> = (0..4200).map(|_| rng.next_u64() as u8).collect();
        for (start, len) in [(0, 0), (0, 1), (3, 7), (1, 8), (5, 9), (0, 4096), (7, 4100)] {
            let bytes = &data[start..start + len];
            let mut bytewise = 0x1234_5678u32;
            for &b in bytes {
                bytewise = CRC32C[0][((bytewise ^ u32::from(b)) & 0xff) as usize] ^ (bytewise >> 8);
            }
            assert_eq!(crc32c_sliced(0x1234_5678, bytes), bytewise, "{start}+{len}");
            assert_eq!(crc32c(0x1234_5678, bytes), bytewise, "{start}+{len}");
        }
    }

    #[test]
    fn crc32c_continues() {
        let whole = crc32c(!0, b"hello, journal");
        let split = crc32c(crc32c(!0, b"hello, "), b"journal");
        assert_eq!(whole, split);
    }

    #[test]
    fn crc32_be_check_value() {
        // CRC-32/MPEG-2: initial !0, not reflected, no final inversion.
        assert_eq!(crc32_be(!0, b"123456789"), 0x0376_e6e7);
    }
}
