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

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
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
        table[i] = crc;
        i += 1;
    }
    table
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

static CRC32C: [u32; 256] = crc32c_table();
static CRC32_BE: [u32; 256] = crc32_be_table();

/// Continues a CRC32C over `bytes`.
pub fn crc32c(mut crc: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        crc = CRC32C[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
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
