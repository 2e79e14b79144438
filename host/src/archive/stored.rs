//! gzip streams of stored (uncompressed) deflate blocks, written and read at copy speed.
//!
//! `tessera pack --compression none` (the default) writes archives this way: still a standard
//! `.tar.gz` that any tool opens, but unpacking it is a copy plus a CRC instead of a
//! single-threaded inflate (flate2 inflates even stored blocks through its window at about
//! 1 GB/s). [`all_stored`] tells, from the block headers alone, whether an archive can be read
//! with [`StoredGzReader`]; anything else is read with flate2.
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::FileExt;

/// Largest stored block deflate allows.
const MAX_BLOCK: usize = 65_535;
/// gzip header: magic, deflate, no flags, no mtime, no extra flags, OS unknown.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

/// Writes a gzip stream of stored blocks to `inner`; [`StoredGzWriter::finish`] ends it.
pub struct StoredGzWriter<W: Write> {
    inner: W,
    block: Vec<u8>,
    crc: crc32fast::Hasher,
    len: u64,
    started: bool,
}

impl<W: Write> StoredGzWriter<W> {
    pub fn new(inner: W) -> Self {
        StoredGzWriter {
            inner,
            block: Vec::with_capacity(MAX_BLOCK),
            crc: crc32fast::Hasher::new(),
            len: 0,
            started: false,
        }
    }

    fn emit(&mut self, last: bool) -> io::Result<()> {
        if !self.started {
            self.inner.write_all(&HEADER)?;
            self.started = true;
        }
        let n = self.block.len() as u16;
        // BFINAL in bit 0, BTYPE 00 (stored), then padding to the byte boundary.
        let mut head = [u8::from(last), 0, 0, 0, 0];
        head[1..3].copy_from_slice(&n.to_le_bytes());
        head[3..5].copy_from_slice(&(!n).to_le_bytes());
        self.inner.write_all(&head)?;
        self.inner.write_all(&self.block)?;
        self.block.clear();
        Ok(())
    }

    /// Writes the last block and the trailer (CRC-32, length mod 2^32); returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.emit(true)?;
        let crc = std::mem::take(&mut self.crc).finalize();
        self.inner.write_all(&crc.to_le_bytes())?;
        self.inner.write_all(&(self.len as u32).to_le_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for StoredGzWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.block.len() == MAX_BLOCK {
            self.emit(false)?;
        }
        let n = buf.len().min(MAX_BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Whether `file` is one gzip member of stored deflate blocks only, as [`StoredGzWriter`]
/// writes: its header has no optional fields, and walking the block headers (a few bytes read
/// per 64 KiB block, at most one block per 4 KiB of file) meets only stored blocks, each with a
/// consistent length, and ends on the trailer at the end of the file. Read errors answer
/// `false` (the general reader reports them).
pub fn all_stored(file: &File) -> bool {
    let Ok(size) = file.metadata().map(|m| m.len()) else {
        return false;
    };
    let mut head = [0u8; 10];
    if file.read_exact_at(&mut head, 0).is_err() || head[..4] != HEADER[..4] {
        return false;
    }
    let mut at = 10u64;
    // A writer of stored blocks fills them (64 KiB); a stream of tiny ones (a hostile upload
    // of empty blocks would cost a read each) is left to the general reader.
    let mut blocks_left = size / 4096 + 16;
    loop {
        if blocks_left == 0 {
            return false;
        }
        blocks_left -= 1;
        let mut block = [0u8; 5];
        if file.read_exact_at(&mut block, at).is_err() || block[0] & 0b110 != 0 {
            return false;
        }
        let len = u16::from_le_bytes([block[1], block[2]]);
        if !len != u16::from_le_bytes([block[3], block[4]]) {
            return false;
        }
        at += 5 + u64::from(len);
        if block[0] & 1 == 1 {
            return at + 8 == size;
        }
        if at >= size {
            return false;
        }
    }
}

/// Reads the contents of a stream [`all_stored`] accepted: stored blocks copied out, the CRC-32
/// and length checked at the end (a mismatch is an `InvalidData` error, as flate2 reports).
pub struct StoredGzReader<R: BufRead> {
    inner: R,
    /// Bytes left in the current block.
    left: usize,
    last: bool,
    done: bool,
    crc: crc32fast::Hasher,
    len: u64,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl<R: BufRead> StoredGzReader<R> {
    pub fn new(mut inner: R) -> io::Result<Self> {
        let mut head = [0u8; 10];
        inner.read_exact(&mut head)?;
        if head[..4] != HEADER[..4] {
            return Err(invalid("not a gzip stream of stored blocks"));
        }
        Ok(StoredGzReader {
            inner,
            left: 0,
            last: false,
            done: false,
            crc: crc32fast::Hasher::new(),
            len: 0,
        })
    }

    /// Moves to the next block (or checks the trailer after the last); false at the end.
    fn next_block(&mut self) -> io::Result<bool> {
        if self.last {
            let mut tail = [0u8; 8];
            self.inner.read_exact(&mut tail)?;
            let crc = std::mem::take(&mut self.crc).finalize();
            if tail[..4] != crc.to_le_bytes() || tail[4..] != (self.len as u32).to_le_bytes() {
                return Err(invalid("corrupt gzip stream: CRC or length mismatch"));
            }
            self.done = true;
            return Ok(false);
        }
        let mut block = [0u8; 5];
        self.inner.read_exact(&mut block)?;
        let len = u16::from_le_bytes([block[1], block[2]]);
        if block[0] & 0b110 != 0 || !len != u16::from_le_bytes([block[3], block[4]]) {
            return Err(invalid(
                "corrupt gzip stream: a block changed after it was checked",
            ));
        }
        self.last = block[0] & 1 == 1;
        self.left = usize::from(len);
        Ok(true)
    }
}

impl<R: BufRead> Read for StoredGzReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() && !self.done {
            if self.left == 0 {
                if !self.next_block()? {
                    break;
                }
                continue;
            }
            let want = (buf.len() - filled).min(self.left);
            let n = match self.inner.read(&mut buf[filled..filled + want]) {
                // What was read so far is counted (and in the CRC): hand it over first.
                Err(_) if filled > 0 => return Ok(filled),
                other => other?,
            };
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.crc.update(&buf[filled..filled + n]);
            self.len += n as u64;
            self.left -= n;
            filled += n;
        }
        Ok(filled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;

    fn stored(data: &[u8], piece: usize) -> Vec<u8> {
        let mut w = StoredGzWriter::new(Vec::new());
        for chunk in data.chunks(piece.max(1)) {
            w.write_all(chunk).unwrap();
        }
        w.finish().unwrap()
    }

    fn file_of(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let file = File::open(f.path()).unwrap();
        (f, file)
    }

    /// What the writer writes, flate2 reads back (a standard gzip stream), and so does the
    /// reader, for empty, one-block, block-boundary and many-block contents.
    #[test]
    fn stored_streams_are_standard_gzip_and_read_back() {
        for len in [
            0usize,
            1,
            MAX_BLOCK - 1,
            MAX_BLOCK,
            MAX_BLOCK + 1,
            5 * MAX_BLOCK + 17,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
            let gz = stored(&data, 10_000);
            let mut back = Vec::new();
            GzDecoder::new(&gz[..]).read_to_end(&mut back).unwrap();
            assert_eq!(back, data, "flate2, {len} bytes");
            let (_keep, file) = file_of(&gz);
            assert!(all_stored(&file), "{len} bytes");
            let mut back = Vec::new();
            StoredGzReader::new(io::BufReader::new(&gz[..]))
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "reader, {len} bytes");
        }
    }

    /// Compressed streams, truncated ones and trailing bytes are not taken for stored ones; a
    /// flipped data byte fails the CRC check.
    #[test]
    fn only_whole_stored_streams_are_read_as_stored_and_corruption_is_caught() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 13) as u8).collect();
        let mut compressed = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        compressed.write_all(&data).unwrap();
        let (_k1, f1) = file_of(&compressed.finish().unwrap());
        assert!(!all_stored(&f1));
        let gz = stored(&data, 4096);
        let (_k2, f2) = file_of(&gz[..gz.len() - 3]);
        assert!(!all_stored(&f2), "truncated");
        let mut longer = gz.clone();
        longer.extend_from_slice(&HEADER);
        let (_k3, f3) = file_of(&longer);
        assert!(!all_stored(&f3), "a second member");
        // Empty blocks by the thousand: left to flate2.
        let mut tiny = HEADER.to_vec();
        for _ in 0..10_000 {
            tiny.extend_from_slice(&[0, 0, 0, 0xff, 0xff]);
        }
        tiny.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
        tiny.extend_from_slice(&crc32fast::hash(&[]).to_le_bytes());
        tiny.extend_from_slice(&[0; 4]);
        let mut back = Vec::new();
        GzDecoder::new(&tiny[..]).read_to_end(&mut back).unwrap();
        let (_k4, f4) = file_of(&tiny);
        assert!(!all_stored(&f4), "ten thousand empty blocks");
        let mut bad = gz.clone();
        bad[100] ^= 1;
        let err = StoredGzReader::new(io::BufReader::new(&bad[..]))
            .unwrap()
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }
}
