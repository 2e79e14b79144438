//! PNG encoding in independent strips, so a large image compresses on several cores.
//!
//! Rows are filtered with Sub (as before: on photos it is nearly as small as adaptive
//! filtering at a fraction of the cost) and compressed the way fast PNG encoders do: every
//! byte a literal except runs of zeros, which become one zero and back-references at
//! distance 1. The image is cut into strips of about [`STRIP_BYTES`] filtered bytes; each
//! strip is one deflate block with a Huffman code built from its own byte counts, ended (but
//! for the last) by an empty stored block, which brings the stream back to a byte boundary,
//! so strips are compressed apart and their bytes simply laid end to end (one IDAT chunk
//! each). The strip layout depends on the image alone, never on how many threads ran, so the
//! bytes are the same natively and inside the Wasm sandbox (where strips run one by one).

/// Filtered bytes per strip (rounded to whole rows, at least one row).
const STRIP_BYTES: usize = 256 << 10;

/// The longest literal/length code: deflate allows 15, 12 lets four literals (and a reference
/// with its extra bits) share one flush of the bit writer, for a negligible loss in size.
const MAX_BITS: usize = 12;
const MAX_CL_BITS: usize = 7;

/// Literal/length alphabet: 256 literals, end of block, 29 length codes.
const LITLEN: usize = 286;
const END_OF_BLOCK: usize = 256;

/// The order code-length code lengths are sent in (RFC 1951, 3.2.7).
const CL_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// The length code for a back-reference of `len` (3..=258): (symbol, extra bits, extra value).
fn length_code(len: usize) -> (usize, u32, u64) {
    debug_assert!((3..=258).contains(&len));
    if len == 258 {
        return (285, 0, 0);
    }
    if len <= 10 {
        return (257 + len - 3, 0, 0);
    }
    // Lengths 11..=257 come in groups of four codes sharing `extra` bits each.
    let extra = usize::BITS - 1 - ((len - 3) >> 2).leading_zeros();
    let base_sym = 261 + 4 * extra as usize;
    let offset = len - 3 - (4 << extra);
    (
        base_sym + (offset >> extra),
        extra,
        (offset & ((1 << extra) - 1)) as u64,
    )
}

/// Zero bytes in a row at the start of `bytes`.
fn zeros_at(bytes: &[u8]) -> usize {
    let mut n = 0;
    for word in bytes.chunks_exact(8) {
        let v = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        if v != 0 {
            return n + (v.trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    n + bytes[n..].iter().take_while(|&&b| b == 0).count()
}

/// Whether any byte of `v` is zero.
#[inline(always)]
fn has_zero_byte(v: u64) -> bool {
    v.wrapping_sub(0x0101_0101_0101_0101) & !v & 0x8080_8080_8080_8080 != 0
}

/// Writes filtered bytes with `lut` (each literal's code, and its length in bits 16..): every
/// byte a literal, but a run of four or more zeros is one literal zero then back-references of
/// 3..=258 bytes at distance 1 (a remainder under three stays literal). Eight bytes without a
/// zero go out four codes to a flush.
fn write_tokens(bytes: &[u8], lut: &[u32; LITLEN], bits: &mut Bits) {
    let code = |sym: usize| ((lut[sym] & 0xffff) as u64, lut[sym] >> 16);
    let mut i = 0;
    while i < bytes.len() {
        if let Some(word) = bytes.get(i..i + 8) {
            let v = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            if !has_zero_byte(v) {
                for four in word.chunks_exact(4) {
                    for &b in four {
                        let (c, l) = code(b as usize);
                        bits.put(c, l);
                    }
                    bits.flush();
                }
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        if b != 0 {
            let (c, l) = code(b as usize);
            bits.put_flush(c, l);
            i += 1;
            continue;
        }
        let run = zeros_at(&bytes[i..]);
        let (c, l) = code(0);
        bits.put_flush(c, l);
        let mut rest = run - 1;
        if run >= 4 {
            while rest >= 3 {
                // Never leave 1 or 2 behind when a shorter reference would take them too.
                let len = match rest.min(258) {
                    len if (1..3).contains(&(rest - len)) => len - 3,
                    len => len,
                };
                let (sym, extra, value) = length_code(len);
                let (c, l) = code(sym);
                // The length, its extra bits, and distance code 0 (one bit): distance 1.
                bits.put_flush(c | value << l, l + extra + 1);
                rest -= len;
            }
        }
        for _ in 0..rest {
            bits.put_flush(c, l);
        }
        i += run;
    }
}

/// Huffman code lengths for `freqs` (zero for unused symbols), none over `limit` bits. Optimal
/// lengths from the classic merge of the two rarest; when some exceed the limit, the counts
/// are halved (keeping every used symbol) and the code built again. Ties break on the symbol
/// order, so the lengths depend on the counts alone.
fn code_lengths(freqs: &[u32], limit: usize) -> Vec<u8> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut counts: Vec<u64> = freqs.iter().map(|&f| f as u64).collect();
    let mut lengths = vec![0u8; freqs.len()];
    let used: Vec<usize> = (0..freqs.len()).filter(|&s| freqs[s] > 0).collect();
    if used.len() == 1 {
        // A lone symbol still gets a complete code (zlib refuses some incomplete ones): it
        // and the first other symbol, one bit each.
        lengths[used[0]] = 1;
        lengths[(used[0] == 0) as usize] = 1;
        return lengths;
    }
    loop {
        // Nodes: leaves are the used symbols, then the merged pairs; parent[] links them up.
        let mut parent = vec![usize::MAX; 2 * used.len()];
        let mut heap: BinaryHeap<Reverse<(u64, usize)>> = used
            .iter()
            .enumerate()
            .map(|(node, &s)| Reverse((counts[s], node)))
            .collect();
        let mut next = used.len();
        while heap.len() > 1 {
            let Reverse((fa, a)) = heap.pop().expect("two left");
            let Reverse((fb, b)) = heap.pop().expect("two left");
            parent[a] = next;
            parent[b] = next;
            heap.push(Reverse((fa + fb, next)));
            next += 1;
        }
        let mut longest = 0;
        for (node, &s) in used.iter().enumerate() {
            let (mut depth, mut n) = (0, node);
            while parent[n] != usize::MAX {
                n = parent[n];
                depth += 1;
            }
            lengths[s] = depth as u8;
            longest = longest.max(depth);
        }
        if longest <= limit {
            return lengths;
        }
        for &s in &used {
            counts[s] = counts[s].div_ceil(2);
        }
    }
}

/// Canonical codes for `lengths` (RFC 1951, 3.2.2), bit-reversed as deflate writes them.
fn canonical_codes(lengths: &[u8]) -> Vec<u16> {
    let mut count = [0u16; MAX_BITS + 1];
    for &l in lengths {
        count[l as usize] += 1;
    }
    count[0] = 0;
    let mut next = [0u16; MAX_BITS + 2];
    let mut code = 0u16;
    for bits in 1..=MAX_BITS {
        code = (code + count[bits - 1]) << 1;
        next[bits] = code;
    }
    lengths
        .iter()
        .map(|&l| {
            if l == 0 {
                return 0;
            }
            let c = next[l as usize];
            next[l as usize] += 1;
            c.reverse_bits() >> (16 - l)
        })
        .collect()
}

/// Bits packed least significant first, as deflate wants them: [`Bits::put`] adds to a 64-bit
/// accumulator, [`Bits::flush`] stores all eight of its bytes (growing the buffer when needed)
/// and keeps the at most 7 bits of an unfinished byte, so up to 56 bits may be put between
/// flushes.
struct Bits {
    out: Vec<u8>,
    pos: usize,
    acc: u64,
    n: u32,
}

impl Bits {
    fn new(capacity: usize) -> Self {
        Bits {
            out: vec![0; capacity + 8],
            pos: 0,
            acc: 0,
            n: 0,
        }
    }

    /// Adds the low `n` bits of `bits`; flush before more than 56 are held.
    #[inline(always)]
    fn put(&mut self, bits: u64, n: u32) {
        debug_assert!(self.n + n <= 64);
        self.acc |= bits << self.n;
        self.n += n;
    }

    #[inline(always)]
    fn flush(&mut self) {
        if self.pos + 8 > self.out.len() {
            self.out.resize(self.out.len() * 2, 0);
        }
        self.out[self.pos..self.pos + 8].copy_from_slice(&self.acc.to_le_bytes());
        let bytes = self.n / 8;
        self.pos += bytes as usize;
        self.acc = self.acc.checked_shr(bytes * 8).unwrap_or(0);
        self.n -= bytes * 8;
    }

    /// Puts and flushes at once.
    fn put_flush(&mut self, bits: u64, n: u32) {
        self.put(bits, n);
        self.flush();
    }

    /// Pads with zero bits to a byte boundary.
    fn align(&mut self) {
        self.put_flush(0, (8 - self.n % 8) % 8);
    }

    fn into_bytes(mut self) -> Vec<u8> {
        debug_assert_eq!(self.n, 0);
        // Strips wait for one another before they are laid end to end: hold no slack.
        self.out.truncate(self.pos);
        self.out.shrink_to_fit();
        self.out
    }
}

/// Runs of the code-length alphabet (RFC 1951, 3.2.7): (symbol 0..=18, extra bits, extra value).
fn run_length(lengths: &[u8]) -> Vec<(u8, u32, u64)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lengths.len() {
        let l = lengths[i];
        let run = lengths[i..].iter().take_while(|&&v| v == l).count();
        let mut left = run;
        if l == 0 {
            while left >= 11 {
                let n = left.min(138);
                out.push((18, 7, (n - 11) as u64));
                left -= n;
            }
            if left >= 3 {
                out.push((17, 3, (left - 3) as u64));
                left = 0;
            }
        } else {
            out.push((l, 0, 0));
            left -= 1;
            while left >= 3 {
                let n = left.min(6);
                out.push((16, 2, (n - 3) as u64));
                left -= n;
            }
        }
        out.extend(std::iter::repeat_n((l, 0, 0), left));
        i += run;
    }
    out
}

/// One strip's deflate bytes (a whole number of bytes) and the Adler-32 of its input.
struct Strip {
    deflate: Vec<u8>,
    adler: u32,
    len: usize,
}

/// Filters `rows` (whole rows of `row_bytes`, `cn` bytes a pixel) with Sub and compresses them
/// into one dynamic-Huffman block, final when `last`.
fn strip(rows: &[u8], row_bytes: usize, cn: usize, last: bool) -> Strip {
    // Rows are filtered one at a time into `line` (a filter-type byte starts each, so no run
    // of zeros crosses a row): the strip is never held filtered.
    let mut line = vec![0u8; row_bytes + 1];
    let filter = |row: &[u8], line: &mut [u8]| {
        line[0] = 1;
        line[1..=cn].copy_from_slice(&row[..cn]);
        for ((o, a), b) in line[1 + cn..].iter_mut().zip(&row[cn..]).zip(row) {
            *o = a.wrapping_sub(*b);
        }
    };

    // The code, from the bytes of every eighth row (zeros in runs counted as literals, which
    // only makes zero's code shorter): every symbol gets a code, counted once more than seen.
    let mut counts = [[0u32; 256]; 4];
    for row in rows.chunks_exact(row_bytes).step_by(8) {
        filter(row, &mut line);
        let mut words = line.chunks_exact(8);
        for w in &mut words {
            if w == [0; 8] {
                counts[0][0] += 8;
                continue;
            }
            for (k, &b) in w.iter().enumerate() {
                counts[k % 4][b as usize] += 1;
            }
        }
        for &b in words.remainder() {
            counts[0][b as usize] += 1;
        }
    }
    let mut freqs = [1u32; LITLEN];
    for (sym, f) in freqs.iter_mut().take(256).enumerate() {
        *f += counts.iter().map(|c| c[sym]).sum::<u32>();
    }
    let lit_lengths = code_lengths(&freqs, MAX_BITS);
    let lit_codes = canonical_codes(&lit_lengths);
    let mut lut = [0u32; LITLEN];
    for (sym, entry) in lut.iter_mut().enumerate() {
        *entry = lit_codes[sym] as u32 | (lit_lengths[sym] as u32) << 16;
    }
    // Every literal/length symbol has a code (counted once at least): all 286 are sent.
    let hlit = LITLEN;
    // One distance code, of one bit: distance 1.
    let dist_lengths = [1u8];

    let mut all = lit_lengths[..hlit].to_vec();
    all.extend_from_slice(&dist_lengths);
    let runs = run_length(&all);
    let mut cl_freqs = [0u32; 19];
    for &(sym, _, _) in &runs {
        cl_freqs[sym as usize] += 1;
    }
    let cl_lengths = code_lengths(&cl_freqs, MAX_CL_BITS);
    let cl_codes = canonical_codes(&cl_lengths);
    let hclen = 4.max(
        19 - CL_ORDER
            .iter()
            .rev()
            .take_while(|&&s| cl_lengths[s] == 0)
            .count(),
    );

    let len = rows.len() + rows.len() / row_bytes;
    let mut bits = Bits::new(len / 2 + 1024);
    bits.put_flush(last as u64, 1);
    bits.put_flush(2, 2); // dynamic Huffman codes
    bits.put_flush((hlit - 257) as u64, 5);
    bits.put_flush(0, 5); // one distance code
    bits.put_flush((hclen - 4) as u64, 4);
    for &s in &CL_ORDER[..hclen] {
        bits.put_flush(cl_lengths[s] as u64, 3);
    }
    for &(sym, extra, value) in &runs {
        let s = sym as usize;
        bits.put_flush(cl_codes[s] as u64, cl_lengths[s] as u32);
        bits.put_flush(value, extra);
    }
    let mut adler = simd_adler32::Adler32::new();
    for row in rows.chunks_exact(row_bytes) {
        filter(row, &mut line);
        adler.write(&line);
        write_tokens(&line, &lut, &mut bits);
    }
    bits.put_flush(
        lit_codes[END_OF_BLOCK] as u64,
        lit_lengths[END_OF_BLOCK] as u32,
    );
    if !last {
        // An empty stored block: back to a byte boundary for the next strip.
        bits.put_flush(0, 3);
        bits.align();
        bits.put_flush(0xffff_0000, 32);
    }
    bits.align();
    Strip {
        deflate: bits.into_bytes(),
        adler: adler.finish(),
        len,
    }
}

/// The Adler-32 of two pieces laid end to end, from theirs and the second's length.
fn adler_combine(first: u32, second: u32, second_len: usize) -> u32 {
    const MOD: u64 = 65521;
    let n = second_len as u64 % MOD;
    let (a1, b1) = (first as u64 & 0xffff, first as u64 >> 16);
    let (a2, b2) = (second as u64 & 0xffff, second as u64 >> 16);
    // a = 1 + all bytes; b = the sum of every prefix's a. The second piece's prefixes each
    // counted its own leading 1 where the whole has a1.
    let a = (a1 + a2 + MOD - 1) % MOD;
    let b = (b1 + b2 + n * a1 % MOD + MOD - n) % MOD;
    (b << 16 | a) as u32
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// An 8-bit `w`x`h` PNG of `cn` (1 to 4: grey, grey+alpha, RGB, RGBA) interleaved channels;
/// `None` for an empty image or pixels that do not match the size.
pub(crate) fn encode(data: &[u8], (w, h): (u32, u32), cn: usize) -> Option<Vec<u8>> {
    let color = [0u8, 4, 2, 6].get(cn.checked_sub(1)?).copied()?;
    let row_bytes = (w as usize).checked_mul(cn)?;
    if row_bytes == 0 || h == 0 || data.len() != row_bytes.checked_mul(h as usize)? {
        return None;
    }
    let rows_per_strip = (STRIP_BYTES / (row_bytes + 1)).max(1);
    let pieces: Vec<&[u8]> = data.chunks(rows_per_strip * row_bytes).collect();
    let last = pieces.len() - 1;
    let indexed: Vec<(usize, &[u8])> = pieces.into_iter().enumerate().collect();
    let strips = crate::par_map(&indexed, |&(i, rows)| strip(rows, row_bytes, cn, i == last));

    let mut out =
        Vec::with_capacity(strips.iter().map(|s| s.deflate.len() + 12).sum::<usize>() + 64);
    out.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, color, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    // The zlib header: deflate with a 32 KiB window, fastest level, check bits.
    chunk(&mut out, b"IDAT", &[0x78, 0x01]);
    let mut adler = 1u32;
    for s in &strips {
        chunk(&mut out, b"IDAT", &s.deflate);
        adler = adler_combine(adler, s.adler, s.len);
    }
    chunk(&mut out, b"IDAT", &adler.to_be_bytes());
    chunk(&mut out, b"IEND", &[]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png_bytes: &[u8]) -> (u32, u32, png::ColorType, Vec<u8>) {
        let mut r = png::Decoder::new(std::io::Cursor::new(png_bytes))
            .read_info()
            .expect("a valid PNG");
        let mut buf = vec![0u8; r.output_buffer_size().expect("fits")];
        let info = r.next_frame(&mut buf).expect("decodes");
        buf.truncate(info.buffer_size());
        (info.width, info.height, info.color_type, buf)
    }

    fn inflate_zlib(png_bytes: &[u8]) -> Vec<u8> {
        // The IDAT payloads, inflated by an independent decoder (zlib's, through flate2).
        let mut z = Vec::new();
        let mut i = 8;
        while i + 8 <= png_bytes.len() {
            let len = u32::from_be_bytes(png_bytes[i..i + 4].try_into().unwrap()) as usize;
            if &png_bytes[i + 4..i + 8] == b"IDAT" {
                z.extend_from_slice(&png_bytes[i + 8..i + 8 + len]);
            }
            i += 12 + len;
        }
        let mut out = Vec::new();
        use std::io::Read;
        flate2::read::ZlibDecoder::new(&z[..])
            .read_to_end(&mut out)
            .expect("zlib accepts the stream, checksum included");
        out
    }

    #[test]
    fn length_codes_follow_the_rfc_table() {
        assert_eq!(length_code(3), (257, 0, 0));
        assert_eq!(length_code(10), (264, 0, 0));
        assert_eq!(length_code(11), (265, 1, 0));
        assert_eq!(length_code(12), (265, 1, 1));
        assert_eq!(length_code(18), (268, 1, 1));
        assert_eq!(length_code(19), (269, 2, 0));
        assert_eq!(length_code(34), (272, 2, 3));
        assert_eq!(length_code(35), (273, 3, 0));
        assert_eq!(length_code(66), (276, 3, 7));
        assert_eq!(length_code(67), (277, 4, 0));
        assert_eq!(length_code(130), (280, 4, 15));
        assert_eq!(length_code(131), (281, 5, 0));
        assert_eq!(length_code(257), (284, 5, 30));
        assert_eq!(length_code(258), (285, 0, 0));
    }

    #[test]
    fn adler_of_pieces_is_adler_of_the_whole() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let whole = simd_adler32::adler32(&data.as_slice());
        for cut in [0, 1, 5552, 65521, 100_000, 199_999, 200_000] {
            let (a, b) = data.split_at(cut);
            let combined = adler_combine(
                simd_adler32::adler32(&a),
                simd_adler32::adler32(&b),
                b.len(),
            );
            assert_eq!(combined, whole, "cut at {cut}");
        }
    }

    #[test]
    fn code_lengths_are_complete_and_limited() {
        // Fibonacci counts make the deepest possible tree: the limit must cut it.
        let mut freqs = vec![0u32; 40];
        let (mut a, mut b) = (1u32, 1u32);
        for f in freqs.iter_mut().take(30) {
            *f = a;
            (a, b) = (b, a + b);
        }
        for limit in [7, 15] {
            let lengths = code_lengths(&freqs, limit);
            assert!(lengths.iter().all(|&l| (l as usize) <= limit));
            let kraft: f64 = lengths
                .iter()
                .filter(|&&l| l > 0)
                .map(|&l| 0.5f64.powi(l as i32))
                .sum();
            assert!(
                (kraft - 1.0).abs() < 1e-12,
                "limit {limit}: Kraft sum {kraft}"
            );
            assert!(lengths[30..].iter().all(|&l| l == 0));
        }
    }

    #[test]
    fn strips_decode_to_the_pixels_in_every_shape() {
        let mut s = 7u32;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                    (s >> 24) as u8
                })
                .collect()
        };
        // Noise, flat, sparse (long zero runs across strip ends), and a few tiny shapes;
        // wide enough that some images span many strips.
        let mut cases: Vec<(u32, u32, usize, Vec<u8>)> = Vec::new();
        for &(w, h) in &[
            (1u32, 1u32),
            (3, 2),
            (16, 16),
            (1000, 301),
            (4096, 70),
            (7, 9000),
        ] {
            for cn in [1usize, 2, 3, 4] {
                let n = w as usize * h as usize * cn;
                cases.push((w, h, cn, noise(n)));
                cases.push((w, h, cn, vec![0; n]));
                cases.push((w, h, cn, vec![200; n]));
                let mut sparse = vec![0u8; n];
                for i in (0..n).step_by(997) {
                    sparse[i] = 255;
                }
                cases.push((w, h, cn, sparse));
            }
        }
        for (w, h, cn, data) in cases {
            let png_bytes = encode(&data, (w, h), cn).expect("pixels match the size");
            let (dw, dh, color, pixels) = decode(&png_bytes);
            assert_eq!((dw, dh), (w, h));
            let want = [
                png::ColorType::Grayscale,
                png::ColorType::GrayscaleAlpha,
                png::ColorType::Rgb,
                png::ColorType::Rgba,
            ];
            assert_eq!(color, want[cn - 1]);
            assert!(pixels == data, "{w}x{h}x{cn}: pixels differ");
            // zlib inflates it too, checking the combined Adler-32.
            let raw = inflate_zlib(&png_bytes);
            assert_eq!(raw.len(), h as usize * (1 + w as usize * cn));
        }
    }

    #[test]
    fn empty_or_mismatched_images_are_refused() {
        assert!(encode(&[], (0, 0), 3).is_none());
        assert!(encode(&[], (0, 5), 1).is_none());
        assert!(encode(&[1, 2], (1, 1), 3).is_none());
        assert!(encode(&[1; 5], (1, 1), 5).is_none());
    }
}
