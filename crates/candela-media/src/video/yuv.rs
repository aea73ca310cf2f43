//! Planar YUV -> RGB8 (BT.601, limited range: what ffmpeg assumes for untagged
//! SD/web video), with chroma of any subsampling repeated over its block.

/// One 8-bit planar picture.
pub(crate) struct YuvPlanes<'a> {
    pub width: usize,
    pub height: usize,
    pub y: &'a [u8],
    pub u: &'a [u8],
    pub v: &'a [u8],
    pub y_stride: usize,
    pub uv_stride: usize,
    /// log2 of the chroma subsampling (1, 1 for 4:2:0).
    pub ss_x: u32,
    pub ss_y: u32,
}

#[inline]
fn clamp8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// Convert to interleaved RGB8; `None` when a plane is shorter than its strides
/// and sizes claim.
pub(crate) fn yuv_to_rgb8(p: &YuvPlanes) -> Option<Vec<u8>> {
    let (cw, ch) = (
        (p.width + (1 << p.ss_x) - 1) >> p.ss_x,
        (p.height + (1 << p.ss_y) - 1) >> p.ss_y,
    );
    let y_need = (p.height - 1) * p.y_stride + p.width;
    let c_need = (ch - 1) * p.uv_stride + cw;
    if p.width == 0
        || p.height == 0
        || p.y.len() < y_need
        || p.u.len() < c_need
        || p.v.len() < c_need
        || p.y_stride < p.width
        || p.uv_stride < cw
    {
        return None;
    }
    let mut out = Vec::with_capacity(p.width * p.height * 3);
    for row in 0..p.height {
        let yl = &p.y[row * p.y_stride..row * p.y_stride + p.width];
        let cr = (row >> p.ss_y) * p.uv_stride;
        for (col, &yv) in yl.iter().enumerate() {
            let ci = cr + (col >> p.ss_x);
            let c = 298 * (yv as i32 - 16);
            let d = p.u[ci] as i32 - 128;
            let e = p.v[ci] as i32 - 128;
            out.push(clamp8((c + 409 * e + 128) >> 8));
            out.push(clamp8((c - 100 * d - 208 * e + 128) >> 8));
            out.push(clamp8((c + 516 * d + 128) >> 8));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greys_and_primaries() {
        let (y, u, v) = ([16u8, 235, 126, 81], [128u8], [128u8]);
        let p = YuvPlanes {
            width: 2,
            height: 2,
            y: &y,
            u: &u,
            v: &v,
            y_stride: 2,
            uv_stride: 1,
            ss_x: 1,
            ss_y: 1,
        };
        let rgb = yuv_to_rgb8(&p).unwrap();
        assert_eq!(&rgb[0..3], &[0, 0, 0]);
        assert_eq!(&rgb[3..6], &[255, 255, 255]);
        // BT.601 red is Y=81, U=90, V=240.
        let (u, v) = ([90u8], [240u8]);
        let p = YuvPlanes { u: &u, v: &v, ..p };
        let rgb = yuv_to_rgb8(&p).unwrap();
        assert!(
            rgb[9] > 250 && rgb[10] < 5 && rgb[11] < 5,
            "{:?}",
            &rgb[9..12]
        );
        let short = YuvPlanes { y: &y[..3], ..p };
        assert!(yuv_to_rgb8(&short).is_none());
    }
}
