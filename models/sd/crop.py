"""The seed's crop-for-filling (Inpaint-Anything's crop_for_filling_pre/post, OpenCV), as the
reference for the handler's. Two slips of the original are fixed, as in the handler: after
padding + scaling the window is clamped with the padded, scaled size (the original used the
unpadded one, so the window could fall off the image), and the padding is cut off with the
scaled-up size (the original used the original height when it had also scaled up).
`geom` carries what pre did so post undoes exactly that."""
import cv2
import numpy as np


def _working(img, geom):
    if geom["upscaled"] is not None:
        img = cv2.resize(img, geom["upscaled"])
    if geom["pad"] is not None:
        rows, padding, factor = geom["pad"]
        if rows:
            spec = ((padding // 2, padding - padding // 2), (0, 0))
        else:
            spec = ((0, 0), (padding // 2, padding - padding // 2))
        img = np.pad(img, spec + ((0, 0),) * (img.ndim - 2), "constant")
        img = cv2.resize(img, (0, 0), fx=factor, fy=factor)
    return img


def crop_for_filling_pre(image: np.ndarray, mask: np.ndarray, crop_size: int = 512):
    height, width = image.shape[:2]
    aspect_ratio = float(width) / float(height)
    geom = {"upscaled": None, "pad": None}
    if min(height, width) < crop_size:
        if height < width:
            new_height = crop_size
            new_width = int(crop_size * aspect_ratio)
        else:
            new_width = crop_size
            new_height = int(crop_size / aspect_ratio)
        geom["upscaled"] = (new_width, new_height)
    m = _working(mask, geom)
    x, y, w, h = cv2.boundingRect(m)
    if w > crop_size or h > crop_size:
        height, width = m.shape[:2]
        geom["pad"] = (height < width, abs(width - height), crop_size / max(w, h))
        m = _working(mask, geom)
        x, y, w, h = cv2.boundingRect(m)
    img = _working(image, geom)
    height, width = img.shape[:2]
    crop_x = min(max(x + w // 2 - crop_size // 2, 0), width - crop_size)
    crop_y = min(max(y + h // 2 - crop_size // 2, 0), height - crop_size)
    geom["window"] = (crop_x, crop_y)
    return (img[crop_y:crop_y + crop_size, crop_x:crop_x + crop_size],
            m[crop_y:crop_y + crop_size, crop_x:crop_x + crop_size], geom)


def crop_for_filling_post(image: np.ndarray, mask: np.ndarray, filled_image: np.ndarray, geom: dict,
                          crop_size: int = 512):
    height_ori, width_ori = image.shape[:2]
    work = _working(image, geom).copy()
    crop_x, crop_y = geom["window"]
    work[crop_y:crop_y + crop_size, crop_x:crop_x + crop_size] = filled_image
    if geom["pad"] is not None:
        rows, padding, factor = geom["pad"]
        before_w, before_h = geom["upscaled"] or (width_ori, height_ori)
        work = cv2.resize(work, (0, 0), fx=1 / factor, fy=1 / factor)
        if rows:
            work = work[padding // 2:padding // 2 + before_h, :]
        else:
            work = work[:, padding // 2:padding // 2 + before_w]
    work = cv2.resize(work, (width_ori, height_ori))
    out = image.copy()
    out[mask == 255] = work[mask == 255]
    return out
