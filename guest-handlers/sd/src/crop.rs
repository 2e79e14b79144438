//! The seed's crop-for-filling around SD2's 512x512 window, with its geometry made explicit so
//! `post` undoes exactly what `pre` did.
//!
//! pre: a short side under `crop` is first scaled up (aspect kept, `cv2.resize` bilinear); the
//! mask's bounding box is found; a box bigger than the window gets the image padded to a square
//! (zeros, centred) and scaled by `crop / max(box w, box h)`; the window is centred on the box
//! and clamped inside the image. post: the generated window is pasted back, the scaling and
//! padding undone, the result resized to the original size, and only masked pixels replaced.
//!
//! Two slips of the seed's code are not copied: after padding and scaling it clamps the window
//! with the unpadded size (the window can then fall off the image and the paste fails), and when
//! it both scaled up and padded it cuts the padding off with the original height instead of the
//! scaled one. Everything else (sizes, rounding, interpolation) is the seed's, bit for bit.
use serde::{Deserialize, Serialize};
use tessera_sdk::img::{cv2_scaled_size, resize_cv2_linear};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Geometry {
    pub crop: usize,
    pub orig: (usize, usize),
    /// Size after scaling the short side up, when that happened.
    pub upscaled: Option<(usize, usize)>,
    pub pad: Option<Pad>,
    /// Window's top-left corner in the working image.
    pub window: (usize, usize),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pad {
    /// Rows were added (top/bottom) when true, columns (left/right) otherwise.
    pub rows: bool,
    pub amount: usize,
    pub factor: f64,
}

/// `cv2.boundingRect` of the non-zero pixels: (x, y, w, h); all zero for an empty mask.
pub fn bounding_rect(mask: &[u8], w: usize) -> (usize, usize, usize, usize) {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for (i, &m) in mask.iter().enumerate() {
        if m != 0 {
            let (x, y) = (i % w, i / w);
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x + 1);
            y1 = y1.max(y + 1);
        }
    }
    if x0 == usize::MAX {
        (0, 0, 0, 0)
    } else {
        (x0, y0, x1 - x0, y1 - y0)
    }
}

/// Zero padding to a square: `amount` split as `amount / 2` before, the rest after.
fn pad_square(px: &[u8], (w, h): (usize, usize), cn: usize, rows: bool, amount: usize) -> Vec<u8> {
    let (nw, nh) = if rows {
        (w, h + amount)
    } else {
        (w + amount, h)
    };
    let mut out = vec![0u8; nw * nh * cn];
    let (ox, oy) = if rows {
        (0, amount / 2)
    } else {
        (amount / 2, 0)
    };
    for y in 0..h {
        let dst = ((y + oy) * nw + ox) * cn;
        out[dst..dst + w * cn].copy_from_slice(&px[y * w * cn..(y + 1) * w * cn]);
    }
    out
}

/// The size the short side's scale-up gives (`None` when the short side is already `crop`).
pub fn upscaled_size((w, h): (usize, usize), crop: usize) -> Option<(usize, usize)> {
    if w.min(h) >= crop {
        return None;
    }
    let aspect = w as f64 / h as f64;
    Some(if h < w {
        ((crop as f64 * aspect) as usize, crop)
    } else {
        (crop, (crop as f64 / aspect) as usize)
    })
}

fn window_origin(
    bbox: (usize, usize, usize, usize),
    (w, h): (usize, usize),
    crop: usize,
) -> (usize, usize) {
    let (x, y, bw, bh) = bbox;
    let at = |p: usize, b: usize, side: usize| -> usize {
        let c = p as i64 + (b / 2) as i64 - (crop / 2) as i64;
        c.max(0).min(side as i64 - crop as i64).max(0) as usize
    };
    (at(x, bw, w), at(y, bh, h))
}

fn cut(
    px: &[u8],
    w: usize,
    cn: usize,
    (x, y): (usize, usize),
    (cw, ch): (usize, usize),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(cw * ch * cn);
    for row in y..y + ch {
        out.extend_from_slice(&px[(row * w + x) * cn..(row * w + x + cw) * cn]);
    }
    out
}

/// The working image (and mask) the window is cut from, per `geom`'s first steps.
fn working(px: &[u8], cn: usize, geom: &Geometry) -> (Vec<u8>, (usize, usize)) {
    let mut size = geom.orig;
    let mut cur = px.to_vec();
    if let Some(up) = geom.upscaled {
        cur = resize_cv2_linear(&cur, size, cn, up, None);
        size = up;
    }
    if let Some(p) = &geom.pad {
        cur = pad_square(&cur, size, cn, p.rows, p.amount);
        let side = size.0.max(size.1);
        let scaled = cv2_scaled_size(side, side, p.factor);
        cur = resize_cv2_linear(&cur, (side, side), cn, scaled, Some((p.factor, p.factor)));
        size = scaled;
    }
    (cur, size)
}

/// Window image (RGB) and mask (one channel) of `crop`x`crop`, and the geometry to undo it.
/// The image must be at least one pixel; an empty mask gives a window at the top-left corner.
pub fn pre(
    image: &[u8],
    mask: &[u8],
    (w, h): (usize, usize),
    crop: usize,
) -> (Vec<u8>, Vec<u8>, Geometry) {
    let mut geom = Geometry {
        crop,
        orig: (w, h),
        upscaled: upscaled_size((w, h), crop),
        pad: None,
        window: (0, 0),
    };
    let (m1, size1) = working(mask, 1, &geom);
    let (_, _, bw, bh) = bounding_rect(&m1, size1.0);
    if bw > crop || bh > crop {
        let rows = size1.1 < size1.0;
        let amount = size1.0.max(size1.1) - size1.0.min(size1.1);
        geom.pad = Some(Pad {
            rows,
            amount,
            factor: crop as f64 / bw.max(bh) as f64,
        });
    }
    let (wm, wsize) = if geom.pad.is_some() {
        working(mask, 1, &geom)
    } else {
        (m1, size1)
    };
    geom.window = window_origin(bounding_rect(&wm, wsize.0), wsize, crop);
    let (wi, _) = working(image, 3, &geom);
    let win_image = cut(&wi, wsize.0, 3, geom.window, (crop, crop));
    let win_mask = cut(&wm, wsize.0, 1, geom.window, (crop, crop));
    (win_image, win_mask, geom)
}

/// The original image with the masked pixels (`mask == 255`) taken from the generated window.
pub fn post(image: &[u8], mask: &[u8], filled: &[u8], geom: &Geometry) -> Vec<u8> {
    let crop = geom.crop;
    let (mut work, mut size) = working(image, 3, geom);
    let (wx, wy) = geom.window;
    for row in 0..crop {
        let dst = ((wy + row) * size.0 + wx) * 3;
        work[dst..dst + crop * 3].copy_from_slice(&filled[row * crop * 3..(row + 1) * crop * 3]);
    }
    if let Some(p) = &geom.pad {
        let inv = 1.0 / p.factor;
        let back = cv2_scaled_size(size.0, size.1, inv);
        work = resize_cv2_linear(&work, size, 3, back, Some((inv, inv)));
        size = back;
        // Cut the padding off: the pre-padding extent along the padded axis (numpy slicing
        // stops at the edge).
        let before = geom.upscaled.unwrap_or(geom.orig);
        let start = p.amount / 2;
        if p.rows {
            let end = (start + before.1).min(size.1);
            work = cut(&work, size.0, 3, (0, start), (size.0, end - start.min(end)));
            size = (size.0, end - start.min(end));
        } else {
            let end = (start + before.0).min(size.0);
            work = cut(&work, size.0, 3, (start, 0), (end - start.min(end), size.1));
            size = (end - start.min(end), size.1);
        }
    }
    let work = resize_cv2_linear(&work, size, 3, geom.orig, None);
    let mut out = image.to_vec();
    for (i, &m) in mask.iter().enumerate() {
        if m == 255 {
            out[i * 3..i * 3 + 3].copy_from_slice(&work[i * 3..i * 3 + 3]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounding_rect_like_opencv() {
        let mut m = vec![0u8; 20 * 10];
        assert_eq!(bounding_rect(&m, 20), (0, 0, 0, 0));
        m[3 * 20 + 5] = 1;
        m[7 * 20 + 11] = 255;
        assert_eq!(bounding_rect(&m, 20), (5, 3, 7, 5));
    }

    #[test]
    fn window_stays_inside_and_post_keeps_unmasked_pixels() {
        // 900x700 with a 600-wide box: padded to a square and scaled down.
        let (w, h) = (900, 700);
        let image: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        let mut mask = vec![0u8; w * h];
        for y in 100..300 {
            for x in 150..750 {
                mask[y * w + x] = 255;
            }
        }
        let (wi, wm, geom) = pre(&image, &mask, (w, h), 512);
        assert_eq!((wi.len(), wm.len()), (512 * 512 * 3, 512 * 512));
        let p = geom.pad.as_ref().unwrap();
        assert!(p.rows && p.amount == 200);
        let filled = vec![9u8; 512 * 512 * 3];
        let out = post(&image, &mask, &filled, &geom);
        for (i, &m) in mask.iter().enumerate() {
            if m == 0 {
                assert_eq!(out[i * 3..i * 3 + 3], image[i * 3..i * 3 + 3]);
            }
        }
        assert!(mask
            .iter()
            .enumerate()
            .any(|(i, &m)| m == 255 && out[i * 3] == 9));
    }
}
