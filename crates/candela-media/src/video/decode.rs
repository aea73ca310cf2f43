//! Video file bytes -> the RGB8 frames a processor samples. With an `ffmpeg`
//! on the machine (ffmpeg.rs) every common codec and container decodes
//! through it; without one, through decoders linked into the binary:
//!
//! - MP4 (`mp4` demuxer): H.264 through OpenH264 (built from its bundled
//!   source), VP9 through `rusty_vp9` (pure Rust).
//! - WebM / Matroska (`matroska-demuxer`): VP9 as above; VP8 key frames only,
//!   through `image-webp`'s VP8 intra decoder (crates.io has no VP8 inter
//!   decoder without libvpx), so a VP8 inter frame that is needed is refused.
//!
//! All packets are demuxed first (they are small), the caller picks frame
//! indices from the frame count and fps, then frames are decoded in order and
//! only the picked ones are converted to RGB: a long video never sits in
//! memory as RGB.

use std::time::Duration;

use super::ffmpeg::{FfmpegTools, FFMPEG_ENV};
use crate::image::{check_pixels, DecodedImage};
use crate::{MediaBudget, MediaError, Reservation};

/// How to decode a video file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoDecodeOptions {
    /// vLLM's `frame_recovery`: a picked frame that fails to decode is replaced
    /// by the next frame that decodes, if one comes before the next picked
    /// frame; otherwise it is dropped. Off: such a frame is an error.
    pub frame_recovery: bool,
    /// Largest width x height per frame, checked on the container's declared
    /// size before decoding and on every decoded frame.
    pub max_pixels: u64,
    /// Most frames (packets) a file may hold.
    pub max_total_frames: usize,
    /// Most bytes of RGB the picked frames may take together (frames are
    /// kept at their decoded size until the processor resizes them).
    pub max_output_bytes: u64,
    /// Memory the picked frames are reserved from before decoding (default:
    /// the process's [`MediaBudget::global`]); each kept frame holds its share.
    pub budget: MediaBudget,
    /// Which decoders to use (default: ffmpeg when found, else the built-in ones).
    pub decoder: VideoDecoder,
    /// Longest one ffmpeg run may take before it is stopped.
    pub ffmpeg_timeout: Duration,
}

/// Where video files are decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VideoDecoder {
    /// ffmpeg when [`FfmpegTools::find`] finds it, else the built-in decoders.
    Auto,
    /// The decoders linked into the binary: H.264 without B-frames (OpenH264),
    /// VP9, VP8 key frames; MP4 and WebM.
    BuiltIn,
    /// This ffmpeg.
    Ffmpeg(FfmpegTools),
}

impl Default for VideoDecodeOptions {
    fn default() -> Self {
        VideoDecodeOptions {
            frame_recovery: false,
            max_pixels: 8192 * 8192,
            max_total_frames: 1 << 20,
            max_output_bytes: 2 << 30,
            budget: MediaBudget::global().clone(),
            decoder: VideoDecoder::Auto,
            ffmpeg_timeout: Duration::from_secs(120),
        }
    }
}

/// The picked frames of a video file.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedVideo {
    /// Picked frames in order (a dropped frame leaves no entry).
    pub frames: Vec<DecodedImage>,
    /// Index of each entry of `frames` among all frames of the file.
    pub frame_indices: Vec<usize>,
    /// Frames in the file's video track.
    pub total_frames: usize,
    /// Average frame rate from the container, when it says.
    pub source_fps: Option<f64>,
    /// "MP4" or "WebM".
    pub container: &'static str,
    /// "H.264", "HEVC", "VP9", "VP8", "AV1", ...
    pub codec: &'static str,
    /// Picked frames that failed and were replaced by a later frame (`frame_recovery`).
    pub recovered: usize,
    /// Picked frames that failed and were left out (`frame_recovery`).
    pub dropped: usize,
}

/// The last check of every decode: frames came, and frame recovery did not
/// lose more than half of the picked ones (a quiet answer about almost
/// nothing is worse than an error).
pub(super) fn finish(
    v: DecodedVideo,
    _opts: &VideoDecodeOptions,
) -> Result<DecodedVideo, MediaError> {
    let picked = v.frames.len() + v.dropped;
    if v.frames.is_empty() || v.dropped * 2 > picked {
        return Err(MediaError::Corrupt(format!(
            "only {} of the {picked} sampled frames of the {}/{} video could be decoded \
             (frame_recovery gives up when more than half are lost)",
            v.frames.len(),
            v.container,
            v.codec
        )));
    }
    Ok(v)
}

/// Decode the frames `select(total_frames, source_fps)` picks (sorted
/// indices) from an MP4 or WebM file. Never panics: a panic inside a demuxer or
/// codec is reported as `Corrupt`.
pub fn decode_video<F>(
    bytes: &[u8],
    opts: &VideoDecodeOptions,
    select: F,
) -> Result<DecodedVideo, MediaError>
where
    F: FnOnce(usize, Option<f64>) -> Result<Vec<usize>, MediaError>,
{
    if bytes.is_empty() {
        return Err(MediaError::Empty("video input is empty (0 bytes)".into()));
    }
    let container = sniff(bytes).ok_or_else(|| {
        MediaError::Unsupported(
            "not a video file: no MP4 / MOV or WebM / Matroska signature found".into(),
        )
    })?;
    let tools = match &opts.decoder {
        VideoDecoder::BuiltIn => None,
        VideoDecoder::Ffmpeg(t) => Some(t.clone()),
        VideoDecoder::Auto => FfmpegTools::find(),
    };
    match tools {
        Some(t) => super::ffmpeg::decode(&t, bytes, opts, select),
        None if opts.decoder == VideoDecoder::Auto => imp::decode(bytes, container, opts, select)
            .map_err(|e| {
                // What the built-in decoders cannot do (another codec, H.264 with
                // B-frames, VP8 inter frames), ffmpeg can: say so.
                let hint = format!(
                    "; this machine has no ffmpeg, which decodes every common video \
                 (install ffmpeg, or set {FFMPEG_ENV} to its path)"
                );
                match e {
                    MediaError::Unsupported(m) => MediaError::Unsupported(m + &hint),
                    MediaError::Corrupt(m) if m.starts_with("video frame") => {
                        MediaError::Unsupported(m + &hint)
                    }
                    e => e,
                }
            }),
        None => imp::decode(bytes, container, opts, select),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Mp4,
    WebM,
}

fn sniff(b: &[u8]) -> Option<Container> {
    if b.len() >= 12 && matches!(&b[4..8], b"ftyp" | b"moov" | b"mdat" | b"free" | b"wide") {
        Some(Container::Mp4)
    } else if b.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) {
        Some(Container::WebM)
    } else {
        None
    }
}

/// Keeps the picked frames as they come out of a decoder, applying frame
/// recovery.
#[cfg_attr(not(feature = "video-files"), allow(dead_code))]
struct Picker<'a> {
    targets: &'a [usize],
    next: usize,
    recovery: bool,
    max_pixels: u64,
    max_bytes: u64,
    bytes: u64,
    /// The picked index whose frame failed, waiting for a replacement.
    waiting: Option<usize>,
    frames: Vec<DecodedImage>,
    indices: Vec<usize>,
    /// Output frames seen so far (decoded or failed).
    seen: usize,
    /// What is left of the reservation for the picked frames.
    memory: Option<Reservation>,
    /// Failed picks replaced by a later frame.
    recovered: usize,
}

#[cfg_attr(not(feature = "video-files"), allow(dead_code))]
impl<'a> Picker<'a> {
    fn new(targets: &'a [usize], opts: &VideoDecodeOptions) -> Self {
        Picker {
            targets,
            next: 0,
            recovery: opts.frame_recovery,
            max_pixels: opts.max_pixels,
            max_bytes: opts.max_output_bytes,
            bytes: 0,
            waiting: None,
            frames: Vec::new(),
            indices: Vec::new(),
            seen: 0,
            memory: None,
            recovered: 0,
        }
    }

    /// A kept frame, holding its share of the reservation.
    fn keep(&mut self, img: DecodedImage, index: usize) {
        let img = match self.memory.as_mut() {
            Some(m) => {
                let share = m.split_off(img.rgb.len() as u64);
                img.holding(share)
            }
            None => img,
        };
        self.frames.push(img);
        self.indices.push(index);
    }

    fn done(&self) -> bool {
        self.next >= self.targets.len() && self.waiting.is_none()
    }

    fn wants(&self) -> bool {
        self.waiting.is_some() || self.targets.get(self.next) == Some(&self.seen)
    }

    /// One output frame: `Ok(rgb)` decoded (only built when `wants()`), or the
    /// decode error.
    fn push(&mut self, frame: Result<Option<DecodedImage>, String>) -> Result<(), MediaError> {
        let k = self.seen;
        self.seen += 1;
        let is_target = self.targets.get(self.next) == Some(&k);
        if is_target {
            // A new picked frame: an unrecovered earlier one is dropped.
            self.waiting = None;
            self.next += 1;
        }
        match frame {
            Ok(Some(img)) => {
                check_pixels(img.width, img.height, self.max_pixels)?;
                self.bytes += img.rgb.len() as u64;
                if self.bytes > self.max_bytes {
                    return Err(MediaError::Invalid(format!(
                        "the picked video frames need more than {} bytes as RGB; \
                         pick fewer frames (fps, max_frames) or send a smaller video",
                        self.max_bytes
                    )));
                }
                if is_target {
                    self.keep(img, k);
                } else if let Some(slot) = self.waiting.take() {
                    self.recovered += 1;
                    self.keep(img, slot);
                }
            }
            Ok(None) => {}
            Err(e) if is_target => {
                if self.recovery {
                    self.waiting = Some(k);
                } else {
                    return Err(MediaError::Corrupt(format!(
                        "video frame {k} cannot be decoded: {e} \
                         (frame_recovery replaces such frames)"
                    )));
                }
            }
            Err(_) => {}
        }
        Ok(())
    }
}

#[cfg(not(feature = "video-files"))]
mod imp {
    use super::*;

    pub(super) fn decode<F>(
        _bytes: &[u8],
        _c: Container,
        _opts: &VideoDecodeOptions,
        _select: F,
    ) -> Result<DecodedVideo, MediaError>
    where
        F: FnOnce(usize, Option<f64>) -> Result<Vec<usize>, MediaError>,
    {
        Err(MediaError::Unsupported(
            "video files are not supported by this build (feature video-files is off); \
             send the video as a list of frames"
                .into(),
        ))
    }
}

#[cfg(feature = "video-files")]
mod imp {
    use super::*;
    use crate::error::guard_codec;
    use crate::video::yuv::{yuv_to_rgb8, YuvPlanes};
    use std::io::Cursor;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Codec {
        H264,
        Vp9,
        Vp8,
    }

    impl Codec {
        fn name(self) -> &'static str {
            match self {
                Codec::H264 => "H.264",
                Codec::Vp9 => "VP9",
                Codec::Vp8 => "VP8",
            }
        }
    }

    pub(super) struct Demuxed {
        pub codec: Codec,
        /// Coded frames in decode order (H.264 as Annex-B, parameter sets
        /// prepended to the first).
        pub packets: Vec<Vec<u8>>,
        pub fps: Option<f64>,
        pub declared: Option<(u32, u32)>,
        /// Display position of each packet's frame, when the decoder hands
        /// frames out in decode order and that differs (H.264 B-frames).
        pub display_order: Option<Vec<usize>>,
    }

    pub(super) fn decode<F>(
        bytes: &[u8],
        c: Container,
        opts: &VideoDecodeOptions,
        select: F,
    ) -> Result<DecodedVideo, MediaError>
    where
        F: FnOnce(usize, Option<f64>) -> Result<Vec<usize>, MediaError>,
    {
        let name = match c {
            Container::Mp4 => "MP4",
            Container::WebM => "WebM",
        };
        let demuxed = guard_codec(&format!("{name} demuxer"), || match c {
            Container::Mp4 => demux_mp4(bytes, opts),
            Container::WebM => demux_webm(bytes, opts),
        })?;
        if let Some((w, h)) = demuxed.declared {
            check_pixels(w, h, opts.max_pixels)?;
        }
        let total = demuxed.packets.len();
        if total == 0 {
            return Err(MediaError::Empty(format!(
                "{name} video track has no frames"
            )));
        }
        let mut targets = select(total, demuxed.fps)?;
        targets.sort_unstable();
        targets.dedup();
        targets.retain(|&i| i < total);
        let mut memory = None;
        if let Some((w, h)) = demuxed.declared {
            let need = targets.len() as u64 * w as u64 * h as u64 * 3;
            if need > opts.max_output_bytes {
                return Err(MediaError::Invalid(format!(
                    "{} frames of {w}x{h} need {need} bytes as RGB, above the limit of {}; \
                     pick fewer frames (fps, max_frames) or send a smaller video",
                    targets.len(),
                    opts.max_output_bytes
                )));
            }
            let what = format!("the {w}x{h} {name} video ({} frames picked)", targets.len());
            memory = Some(opts.budget.reserve(need, &what)?);
        }
        let (frames, indices, recovered) =
            guard_codec(&format!("{} decoder", demuxed.codec.name()), || {
                run_decoder(&demuxed, &targets, opts, memory)
            })?;
        let dropped = targets.len() - indices.len();
        finish(
            DecodedVideo {
                frames,
                frame_indices: indices,
                total_frames: total,
                source_fps: demuxed.fps,
                container: name,
                codec: demuxed.codec.name(),
                recovered,
                dropped,
            },
            opts,
        )
    }

    fn run_decoder(
        d: &Demuxed,
        targets: &[usize],
        opts: &VideoDecodeOptions,
        memory: Option<Reservation>,
    ) -> Result<(Vec<DecodedImage>, Vec<usize>, usize), MediaError> {
        let mut picker = Picker::new(targets, opts);
        picker.memory = memory;
        match d.codec {
            Codec::H264 => decode_h264(&d.packets, d.display_order.as_deref(), &mut picker)?,
            Codec::Vp9 => decode_vp9(&d.packets, &mut picker)?,
            Codec::Vp8 => decode_vp8(&d.packets, &mut picker)?,
        }
        if !opts.frame_recovery && picker.next < targets.len() {
            return Err(MediaError::Corrupt(format!(
                "video ended after {} decodable frames, before frame {}",
                picker.seen, targets[picker.next]
            )));
        }
        Ok((picker.frames, picker.indices, picker.recovered))
    }

    fn rgb_of(p: &YuvPlanes) -> Result<Option<DecodedImage>, String> {
        let rgb = yuv_to_rgb8(p).ok_or("decoded planes are smaller than their size")?;
        DecodedImage::from_rgb8(p.width as u32, p.height as u32, rgb)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    // ---- MP4 ----------------------------------------------------------------

    /// A reader for the `mp4` crate that fails once it has been called a
    /// budget of times. The crate's box loops (0.14) re-read forever a child
    /// box that declares fewer bytes than its own header (size 0 inside
    /// `minf`, say), so a file gets the calls a valid one of its size needs
    /// (each reads or skips a byte or more of it, a box's seeks aside, plus a
    /// seek and a read per sample) and then an error, never a spinning thread.
    struct CallBudget<R> {
        inner: R,
        left: u64,
    }

    impl<R> CallBudget<R> {
        fn new(inner: R, len: usize, max_frames: usize) -> Self {
            let left = 4 * len as u64 + 4 * max_frames as u64 + 4096;
            Self { inner, left }
        }

        fn spend(&mut self) -> std::io::Result<()> {
            if self.left == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "its boxes loop (a box declares fewer bytes than its header)",
                ));
            }
            self.left -= 1;
            Ok(())
        }
    }

    impl<R: std::io::Read> std::io::Read for CallBudget<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.spend()?;
            self.inner.read(buf)
        }
    }

    impl<R: std::io::Seek> std::io::Seek for CallBudget<R> {
        fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
            self.spend()?;
            self.inner.seek(pos)
        }
    }

    fn demux_mp4(bytes: &[u8], opts: &VideoDecodeOptions) -> Result<Demuxed, MediaError> {
        use mp4::{MediaType, TrackType};
        let corrupt = |e: mp4::Error| MediaError::Corrupt(format!("MP4 file is malformed: {e}"));
        let input = CallBudget::new(Cursor::new(bytes), bytes.len(), opts.max_total_frames);
        let mut reader = mp4::Mp4Reader::read_header(input, bytes.len() as u64).map_err(corrupt)?;
        let mut video: Vec<(u32, String)> = Vec::new();
        let mut pick = None;
        let mut ids: Vec<u32> = reader.tracks().keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let t = &reader.tracks()[&id];
            if !matches!(t.track_type(), Ok(TrackType::Video)) {
                continue;
            }
            let fourcc = t
                .box_type()
                .map(|b| b.to_string())
                .ok()
                .or_else(|| video_fourcc(bytes))
                .unwrap_or_else(|| "?".into());
            match t.media_type() {
                Ok(MediaType::H264) | Ok(MediaType::VP9) if pick.is_none() => pick = Some(id),
                _ => video.push((id, fourcc)),
            }
        }
        let Some(id) = pick else {
            return Err(match video.first() {
                Some((_, f)) => MediaError::Unsupported(format!(
                    "{} video (MP4 codec '{f}') is not supported by the built-in decoders (accepted: H.264, VP9)",
                    codec_of_fourcc(f)
                )),
                None => MediaError::Unsupported("MP4 file has no video track".into()),
            });
        };
        let track = &reader.tracks()[&id];
        let codec = match track.media_type() {
            Ok(MediaType::VP9) => Codec::Vp9,
            _ => Codec::H264,
        };
        let count = track.sample_count() as usize;
        if count > opts.max_total_frames {
            return Err(MediaError::Invalid(format!(
                "video has {count} frames, above the limit of {}",
                opts.max_total_frames
            )));
        }
        // Refuse sample sizes the file cannot hold before the demuxer
        // allocates them.
        let stsz = &track.trak.mdia.minf.stbl.stsz;
        let too_big = |s: u32| s as usize > bytes.len();
        if too_big(stsz.sample_size) || stsz.sample_sizes.iter().any(|&s| too_big(s)) {
            return Err(MediaError::Corrupt(
                "MP4 sample table declares samples larger than the file".into(),
            ));
        }
        let secs = track.duration().as_secs_f64();
        let fps = (count > 0 && secs > 0.0).then(|| count as f64 / secs);
        let declared =
            Some((track.width() as u32, track.height() as u32)).filter(|&(w, h)| w > 0 && h > 0);

        let (header, nal_len) = if codec == Codec::H264 {
            let avc1 = track
                .trak
                .mdia
                .minf
                .stbl
                .stsd
                .avc1
                .as_ref()
                .ok_or_else(|| MediaError::Unsupported("H.264 track is not 'avc1'".into()))?;
            let mut header = Vec::new();
            for nal in avc1
                .avcc
                .sequence_parameter_sets
                .iter()
                .chain(&avc1.avcc.picture_parameter_sets)
            {
                header.extend_from_slice(&[0, 0, 0, 1]);
                header.extend_from_slice(&nal.bytes);
            }
            (header, avc1.avcc.length_size_minus_one as usize + 1)
        } else {
            (Vec::new(), 0)
        };

        let mut packets = Vec::with_capacity(count);
        let mut times = Vec::with_capacity(count);
        for sample_id in 1..=count as u32 {
            let sample = reader
                .read_sample(id, sample_id)
                .map_err(corrupt)?
                .ok_or_else(|| MediaError::Corrupt(format!("MP4 sample {sample_id} is missing")))?;
            times.push(sample.start_time as i128 + sample.rendering_offset as i128);
            let data: &[u8] = &sample.bytes;
            packets.push(if codec == Codec::H264 {
                let mut p = if sample_id == 1 {
                    header.clone()
                } else {
                    Vec::new()
                };
                avcc_to_annexb(data, nal_len, &mut p);
                p
            } else {
                data.to_vec()
            });
        }
        // Composition times give the display order of decode-ordered samples.
        let mut by_time: Vec<usize> = (0..count).collect();
        by_time.sort_by_key(|&i| (times[i], i));
        let mut display = vec![0usize; count];
        for (rank, &i) in by_time.iter().enumerate() {
            display[i] = rank;
        }
        let display_order = display
            .iter()
            .enumerate()
            .any(|(i, &d)| i != d)
            .then_some(display);
        Ok(Demuxed {
            codec,
            packets,
            fps,
            declared,
            display_order,
        })
    }

    /// Length-prefixed NAL units -> start-code-prefixed ones. A length running
    /// past the end keeps what is there (the decoder will judge it).
    pub(super) fn avcc_to_annexb(mut data: &[u8], len_size: usize, out: &mut Vec<u8>) {
        while data.len() >= len_size && len_size > 0 {
            let n = data[..len_size]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | b as usize);
            data = &data[len_size..];
            let n = n.min(data.len());
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
    }

    /// The sample entry type of a video track, read from the first `stsd`
    /// box that has one the mp4 crate does not parse (hvc1, av01, ...).
    fn video_fourcc(bytes: &[u8]) -> Option<String> {
        bytes
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == b"stsd")
            .find_map(|(i, _)| {
                // stsd: type, version + flags, entry count, then the entry's size and type.
                let f = bytes.get(i + 16..i + 20)?;
                let f = std::str::from_utf8(f).ok()?;
                (codec_of_fourcc(f) != "an unknown codec's").then(|| f.to_string())
            })
    }

    fn codec_of_fourcc(f: &str) -> &'static str {
        match f {
            "hvc1" | "hev1" => "HEVC",
            "av01" => "AV1",
            "vp08" => "VP8",
            "vp09" => "VP9",
            "avc1" | "avc3" => "H.264",
            "mp4v" => "MPEG-4 Part 2",
            "jpeg" | "mjpa" => "Motion JPEG",
            "apch" | "apcn" | "apcs" | "apco" | "ap4h" => "ProRes",
            _ => "an unknown codec's",
        }
    }

    // ---- WebM ---------------------------------------------------------------

    /// The demuxer's error in words: its Display of an I/O error is the
    /// error's `source()`, usually "None".
    fn webm_error(e: matroska_demuxer::DemuxError) -> MediaError {
        use matroska_demuxer::DemuxError as E;
        MediaError::Corrupt(match e {
            E::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                "WebM file is truncated: it ends in the middle of an element".into()
            }
            E::IoError(io) => format!("WebM file cannot be read: {io}"),
            E::ElementSizeExceedsStream { declared, available } => format!(
                "WebM file is truncated: an element declares {declared} bytes and only {available} remain"
            ),
            E::CantFindCluster => "WebM file is truncated or damaged: it has no cluster of frames".into(),
            other => format!("WebM file is malformed: {other}"),
        })
    }

    fn demux_webm(bytes: &[u8], opts: &VideoDecodeOptions) -> Result<Demuxed, MediaError> {
        use matroska_demuxer::{Frame, MatroskaFile, TrackType};
        let corrupt = webm_error;
        let mut file = MatroskaFile::open(Cursor::new(bytes)).map_err(corrupt)?;
        let track = file
            .tracks()
            .iter()
            .find(|t| t.track_type() == TrackType::Video)
            .ok_or_else(|| MediaError::Unsupported("WebM file has no video track".into()))?;
        let codec = match track.codec_id() {
            "V_VP9" => Codec::Vp9,
            "V_VP8" => Codec::Vp8,
            other => {
                let name = match other {
                    "V_AV1" => "AV1",
                    "V_MPEGH/ISO/HEVC" => "HEVC",
                    "V_MPEG4/ISO/AVC" => "H.264",
                    _ => "this codec's",
                };
                return Err(MediaError::Unsupported(format!(
                    "{name} video (Matroska codec '{other}') is not supported by the built-in decoders (accepted: VP9, VP8 key frames)"
                )));
            }
        };
        if track.content_encodings().is_some_and(|c| !c.is_empty()) {
            return Err(MediaError::Unsupported(
                "WebM tracks with content encoding (compression or encryption) are not supported"
                    .into(),
            ));
        }
        let number = track.track_number().get();
        let declared = track.video().and_then(|v| {
            let (w, h) = (v.pixel_width().get(), v.pixel_height().get());
            Some((u32::try_from(w).ok()?, u32::try_from(h).ok()?))
        });
        let default_ns = track.default_duration().map(|d| d.get());
        let scale_ns = file.info().timestamp_scale().get() as f64;

        let mut packets = Vec::new();
        let (mut first, mut last) = (None, 0u64);
        let mut frame = Frame::default();
        while file.next_frame(&mut frame).map_err(corrupt)? {
            if frame.track != number {
                continue;
            }
            if packets.len() >= opts.max_total_frames {
                return Err(MediaError::Invalid(format!(
                    "video has more than {} frames",
                    opts.max_total_frames
                )));
            }
            first.get_or_insert(frame.timestamp);
            last = frame.timestamp;
            packets.push(std::mem::take(&mut frame.data));
        }
        let fps = match (default_ns, first) {
            (Some(ns), _) if ns > 0 => Some(1e9 / ns as f64),
            (_, Some(f)) if packets.len() > 1 && last > f => {
                Some((packets.len() - 1) as f64 / ((last - f) as f64 * scale_ns / 1e9))
            }
            _ => None,
        };
        Ok(Demuxed {
            codec,
            packets,
            fps,
            declared,
            display_order: None,
        })
    }

    // ---- codecs -------------------------------------------------------------

    /// An owned copy of a decoded 4:2:0 picture, for frames that arrive
    /// before their turn in display order.
    struct OwnedYuv {
        width: usize,
        height: usize,
        planes: [Vec<u8>; 3],
        strides: (usize, usize),
    }

    impl OwnedYuv {
        fn planes(&self) -> YuvPlanes<'_> {
            YuvPlanes {
                width: self.width,
                height: self.height,
                y: &self.planes[0],
                u: &self.planes[1],
                v: &self.planes[2],
                y_stride: self.strides.0,
                uv_stride: self.strides.1,
                ss_x: 1,
                ss_y: 1,
            }
        }
    }

    fn decode_h264(
        packets: &[Vec<u8>],
        display_order: Option<&[usize]>,
        picker: &mut Picker,
    ) -> Result<(), MediaError> {
        use std::collections::BTreeMap;

        use openh264::decoder::{DecodedYUV, Decoder};
        use openh264::formats::YUVSource;
        let mut dec = Decoder::new()
            .map_err(|e| MediaError::Corrupt(format!("cannot start the H.264 decoder: {e}")))?;
        fn planes<'a>(y: &'a DecodedYUV<'_>) -> YuvPlanes<'a> {
            let (w, h) = y.dimensions();
            let (ys, us, _) = y.strides();
            YuvPlanes {
                width: w,
                height: h,
                y: y.y(),
                u: y.u(),
                v: y.v(),
                y_stride: ys,
                uv_stride: us,
                ss_x: 1,
                ss_y: 1,
            }
        }
        fn owned(y: &DecodedYUV<'_>) -> OwnedYuv {
            let p = planes(y);
            OwnedYuv {
                width: p.width,
                height: p.height,
                planes: [p.y.to_vec(), p.u.to_vec(), p.v.to_vec()],
                strides: (p.y_stride, p.uv_stride),
            }
        }
        // OpenH264 hands frames out in decode order: with B-frames, the k-th
        // output is display frame display_order[k]. Frames wait here until
        // all display frames before them are through.
        let mut pending: BTreeMap<usize, Result<OwnedYuv, String>> = BTreeMap::new();
        let mut outputs = 0usize;
        let release = |pending: &mut BTreeMap<usize, Result<OwnedYuv, String>>,
                       picker: &mut Picker,
                       all: bool|
         -> Result<(), MediaError> {
            loop {
                let r = match pending.remove(&picker.seen) {
                    Some(r) => r,
                    // A display slot that never came out (end of stream).
                    None if all && !pending.is_empty() => Err("frame missing".into()),
                    None => return Ok(()),
                };
                let out = match r {
                    Ok(y) if picker.wants() => rgb_of(&y.planes()),
                    Ok(_) => Ok(None),
                    Err(e) => Err(e),
                };
                picker.push(out)?;
            }
        };
        let mut frame_out = |r: Result<&DecodedYUV, String>,
                             pending: &mut BTreeMap<usize, Result<OwnedYuv, String>>,
                             picker: &mut Picker|
         -> Result<(), MediaError> {
            let k = outputs;
            outputs += 1;
            match display_order {
                None => {
                    let wants = picker.wants();
                    let out = match r {
                        Ok(y) if wants => rgb_of(&planes(y)),
                        Ok(_) => Ok(None),
                        Err(e) => Err(e),
                    };
                    picker.push(out)
                }
                Some(order) => {
                    let slot = order.get(k).copied().unwrap_or(k);
                    pending.insert(slot, r.map(owned));
                    release(pending, picker, false)
                }
            }
        };
        for p in packets {
            if picker.done() {
                return Ok(());
            }
            match dec.decode(p) {
                Ok(Some(yuv)) => frame_out(Ok(&yuv), &mut pending, picker)?,
                // Buffered: the frame comes out later.
                Ok(None) => {}
                Err(e) => frame_out(Err(e.to_string()), &mut pending, picker)?,
            }
        }
        let rest = dec
            .flush_remaining()
            .map_err(|e| MediaError::Corrupt(format!("H.264 decoder failed at the end: {e}")))?;
        for yuv in &rest {
            if picker.done() {
                return Ok(());
            }
            frame_out(Ok(yuv), &mut pending, picker)?;
        }
        release(&mut pending, picker, true)
    }

    fn decode_vp9(packets: &[Vec<u8>], picker: &mut Picker) -> Result<(), MediaError> {
        use rusty_vp9::{Error, Vp9Decoder};
        let mut dec = Vp9Decoder::new();
        let max_pixels = picker.max_pixels;
        for (i, p) in packets.iter().enumerate() {
            if picker.done() {
                return Ok(());
            }
            // The frame header's size, before the decoder allocates planes.
            let mut r = rusty_vp9::BitReader::new(p);
            if let Ok(h) = rusty_vp9::parse_uncompressed_header(&mut r, &[(0, 0); 8]) {
                if h.width > 0 && h.height > 0 {
                    check_pixels(h.width, h.height, max_pixels)?;
                }
            }
            if let Err(e) = dec.push(p, Some(i as i64)) {
                picker.push(Err(e.to_string()))?;
                continue;
            }
            loop {
                let wants = picker.wants();
                match dec.next_frame() {
                    Ok(f) => {
                        let out = if !wants {
                            Ok(None)
                        } else if f.bit_depth != 8 {
                            Err(format!("{}-bit VP9 is not supported", f.bit_depth))
                        } else {
                            rgb_of(&YuvPlanes {
                                width: f.width as usize,
                                height: f.height as usize,
                                y: &f.planes[0],
                                u: &f.planes[1],
                                v: &f.planes[2],
                                y_stride: f.strides[0],
                                uv_stride: f.strides[1],
                                ss_x: f.subsampling_x,
                                ss_y: f.subsampling_y,
                            })
                        };
                        picker.push(out)?;
                    }
                    Err(Error::Again) | Err(Error::Eof) => break,
                    Err(e) => {
                        picker.push(Err(e.to_string()))?;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn decode_vp8(packets: &[Vec<u8>], picker: &mut Picker) -> Result<(), MediaError> {
        use image_webp::vp8::Vp8Decoder;
        for p in packets {
            if picker.done() {
                return Ok(());
            }
            if !picker.wants() {
                picker.push(Ok(None))?;
                continue;
            }
            // Bit 0 of the frame tag is 0 for a key frame.
            if p.first().is_some_and(|b| b & 1 == 1) {
                return Err(MediaError::Unsupported(format!(
                    "VP8 video frame {} is an inter frame; only VP8 key frames can be decoded \
                     (no VP8 inter decoder is linked). Send VP9 or H.264, or a frame list",
                    picker.seen
                )));
            }
            let out = match Vp8Decoder::decode_frame(Cursor::new(p.as_slice())) {
                Ok(f) => {
                    let (w, h) = (f.width as usize, f.height as usize);
                    let bw = w.div_ceil(16) * 16;
                    rgb_of(&YuvPlanes {
                        width: w,
                        height: h,
                        y: &f.ybuf,
                        u: &f.ubuf,
                        v: &f.vbuf,
                        y_stride: bw,
                        uv_stride: bw / 2,
                        ss_x: 1,
                        ss_y: 1,
                    })
                }
                Err(e) => Err(e.to_string()),
            };
            picker.push(out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(v: u8) -> DecodedImage {
        DecodedImage::from_rgb8(1, 1, vec![v; 3]).unwrap()
    }

    #[test]
    fn picker_recovers_from_the_next_good_frame() {
        let opts = VideoDecodeOptions {
            frame_recovery: true,
            ..Default::default()
        };
        let targets = [0, 3, 6];
        let mut p = Picker::new(&targets, &opts);
        p.push(Ok(Some(img(0)))).unwrap(); // 0 picked
        p.push(Ok(Some(img(1)))).unwrap();
        p.push(Ok(Some(img(2)))).unwrap();
        p.push(Err("bad".into())).unwrap(); // 3 picked, fails
        p.push(Err("bad".into())).unwrap(); // 4 fails too
        p.push(Ok(Some(img(5)))).unwrap(); // 5 replaces 3
        p.push(Err("bad".into())).unwrap(); // 6 picked, fails; nothing after
        assert_eq!(p.indices, vec![0, 3]);
        assert_eq!(p.frames[1].rgb[0], 5);

        // Without recovery a failing picked frame is an error.
        let mut p = Picker::new(&targets, &VideoDecodeOptions::default());
        p.push(Ok(Some(img(0)))).unwrap();
        p.push(Ok(None)).unwrap();
        p.push(Err("bad".into())).unwrap(); // not picked: ignored
        assert!(matches!(
            p.push(Err("bad".into())),
            Err(MediaError::Corrupt(_))
        ));
    }

    #[test]
    fn recovery_never_crosses_the_next_target() {
        let opts = VideoDecodeOptions {
            frame_recovery: true,
            ..Default::default()
        };
        let targets = [1, 2];
        let mut p = Picker::new(&targets, &opts);
        p.push(Ok(Some(img(0)))).unwrap();
        p.push(Err("bad".into())).unwrap(); // 1 fails
        p.push(Ok(Some(img(2)))).unwrap(); // 2 is its own target
        assert_eq!(p.indices, vec![2]);
    }

    /// A child box of size 0 inside `minf` made the mp4 crate re-read it
    /// forever (found by `video_fuzz`); it is a 4xx now.
    #[cfg(feature = "video-files")]
    #[test]
    fn an_mp4_box_smaller_than_its_header_is_refused() {
        fn mp4_box(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
            let mut b = ((body.len() + 8) as u32).to_be_bytes().to_vec();
            b.extend_from_slice(kind);
            b.extend_from_slice(body);
            b
        }
        let looping = [0, 0, 0, 0, b'z', b'z', b'z', b'z'];
        let minf = mp4_box(b"minf", &looping);
        let moov = mp4_box(b"moov", &mp4_box(b"trak", &mp4_box(b"mdia", &minf)));
        let mut file = mp4_box(b"ftyp", b"isom\0\0\x02\0isom");
        file.extend(moov);
        let sel = |n: usize, _| Ok((0..n).collect());
        let opts = VideoDecodeOptions {
            decoder: VideoDecoder::BuiltIn,
            ..Default::default()
        };
        let err = decode_video(&file, &opts, sel).unwrap_err();
        assert!(matches!(err, MediaError::Corrupt(_)), "{err:?}");
        assert!(err.to_string().contains("loop"), "{err}");
    }

    #[test]
    fn garbage_is_refused() {
        let sel = |n: usize, _| Ok((0..n).collect());
        assert!(matches!(
            decode_video(b"", &Default::default(), sel),
            Err(MediaError::Empty(_))
        ));
        assert!(matches!(
            decode_video(b"hello world, not a video", &Default::default(), sel),
            Err(MediaError::Unsupported(_))
        ));
    }
}
