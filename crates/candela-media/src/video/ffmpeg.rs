//! Video through an `ffmpeg` found at run time (as llama.cpp's tools do):
//! every codec and container people have (H.264 of every profile, HEVC, VP8,
//! VP9, AV1 in MP4 / MOV / WebM / MKV) without linking a system library into
//! the prebuilt addon. `CANDELA_FFMPEG` names the executable (its `ffprobe`
//! sits beside it); otherwise both are looked up on PATH.
//!
//! The file goes to a private temp file (an MP4 whose index is at the end
//! cannot be read from a pipe); `ffprobe` counts its frames, the caller picks
//! indices, and `ffmpeg` pipes back exactly the picked frames as raw RGB24 at
//! the stream's size. Each run is bounded: wall time (killed past it), output
//! (killed past the picked frames' size) and, on Unix, address space.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use super::decode::{DecodedVideo, VideoDecodeOptions};
use crate::image::{check_pixels, DecodedImage};
use crate::MediaError;

/// The env var naming the ffmpeg executable; set to a path that does not exist to turn ffmpeg off.
pub const FFMPEG_ENV: &str = "CANDELA_FFMPEG";

/// Address space for one ffmpeg / ffprobe run (decoders of 4K video need a few hundred MB).
const MAX_ADDRESS_SPACE: u64 = 4 << 30;
/// Stderr kept for error messages.
const MAX_STDERR: usize = 16 << 10;

/// ffmpeg and ffprobe, when this machine has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfmpegTools {
    ffmpeg: PathBuf,
    ffprobe: PathBuf,
}

impl FfmpegTools {
    /// `CANDELA_FFMPEG` (and the `ffprobe` beside it) when set, else both on PATH.
    pub fn find() -> Option<FfmpegTools> {
        let exe = |name: &str| format!("{name}{}", std::env::consts::EXE_SUFFIX);
        if let Some(p) = std::env::var_os(FFMPEG_ENV).filter(|p| !p.is_empty()) {
            let ffmpeg = PathBuf::from(p);
            let ffprobe = ffmpeg.with_file_name(exe("ffprobe"));
            return (ffmpeg.is_file() && ffprobe.is_file())
                .then_some(FfmpegTools { ffmpeg, ffprobe });
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let on_path = |name: &str| {
            std::env::split_paths(&path)
                .map(|d| d.join(exe(name)))
                .find(|p| p.is_file())
        };
        Some(FfmpegTools {
            ffmpeg: on_path("ffmpeg")?,
            ffprobe: on_path("ffprobe")?,
        })
    }
}

/// What ffprobe says about the first video stream.
struct Probe {
    codec: String,
    width: u32,
    height: u32,
    frames: usize,
    fps: Option<f64>,
}

/// Decode the frames `select(total, fps)` picks with ffmpeg.
pub(super) fn decode<F>(
    tools: &FfmpegTools,
    bytes: &[u8],
    opts: &VideoDecodeOptions,
    select: F,
) -> Result<DecodedVideo, MediaError>
where
    F: FnOnce(usize, Option<f64>) -> Result<Vec<usize>, MediaError>,
{
    let file = TempFile::write(bytes)?;
    let p = probe(tools, file.path(), opts)?;
    check_pixels(p.width, p.height, opts.max_pixels)?;
    if p.frames == 0 {
        return Err(MediaError::Empty(format!(
            "the {} video has no frames",
            codec_name(&p.codec)
        )));
    }
    if p.frames > opts.max_total_frames {
        return Err(MediaError::Invalid(format!(
            "video has more than {} frames",
            opts.max_total_frames
        )));
    }
    let mut targets = select(p.frames, p.fps)?;
    targets.sort_unstable();
    targets.dedup();
    targets.retain(|&i| i < p.frames);
    if targets.is_empty() {
        return Err(MediaError::Invalid("no video frame was picked".into()));
    }
    let frame_bytes = p.width as usize * p.height as usize * 3;
    let need = (targets.len() * frame_bytes) as u64;
    if need > opts.max_output_bytes {
        return Err(MediaError::Invalid(format!(
            "{} frames of {}x{} need {need} bytes as RGB, above the limit of {}; \
             pick fewer frames (fps, max_frames) or send a smaller video",
            targets.len(),
            p.width,
            p.height,
            opts.max_output_bytes
        )));
    }
    let what = format!(
        "the {}x{} {} video ({} frames picked)",
        p.width,
        p.height,
        codec_name(&p.codec),
        targets.len()
    );
    let mut memory = opts.budget.reserve(need, &what)?;

    // n is the frame's position in display order, as the built-in decoders count.
    let picks: Vec<String> = targets.iter().map(|i| format!("eq(n,{i})")).collect();
    let filter = format!(
        "select='{}',scale=w={}:h={}",
        picks.join("+"),
        p.width,
        p.height
    );
    let mut cmd = Command::new(&tools.ffmpeg);
    cmd.args([
        "-v",
        "error",
        "-nostdin",
        "-noautorotate",
        "-threads",
        "2",
        "-i",
    ])
    .arg(file.path())
    .args(["-map", "0:v:0", "-an", "-sn", "-dn", "-vf"])
    .arg(filter)
    .args([
        "-fps_mode",
        "passthrough",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "pipe:1",
    ]);
    let run = run_bounded(cmd, need as usize, opts.ffmpeg_timeout)?;
    let got = run.stdout.len() / frame_bytes;
    if !run.status.success() && got == 0 {
        return Err(MediaError::Corrupt(format!(
            "ffmpeg cannot decode the {} video: {}",
            codec_name(&p.codec),
            first_line(&run.stderr, file.path())
        )));
    }
    // ffmpeg leaves out frames it cannot decode; which ones is not said, so
    // the frames that came are taken as the first picks.
    let missing = targets.len() - got;
    if missing > 0 && !opts.frame_recovery {
        return Err(MediaError::Corrupt(format!(
            "{missing} of the {} picked frames of the {} video cannot be decoded ({}) \
             (frame_recovery keeps the others)",
            targets.len(),
            codec_name(&p.codec),
            first_line(&run.stderr, file.path())
        )));
    }
    let mut frames = Vec::with_capacity(got);
    for chunk in run.stdout.chunks_exact(frame_bytes) {
        let share = memory.split_off(frame_bytes as u64);
        frames.push(DecodedImage::from_rgb8(p.width, p.height, chunk.to_vec())?.holding(share));
    }
    drop(run.stdout);
    targets.truncate(got);
    super::decode::finish(
        DecodedVideo {
            frames,
            frame_indices: targets,
            total_frames: p.frames,
            source_fps: p.fps,
            container: "video",
            codec: codec_name(&p.codec),
            recovered: 0,
            dropped: missing,
        },
        opts,
    )
}

/// ffprobe's codec name as people write it.
fn codec_name(ffprobe: &str) -> &'static str {
    match ffprobe {
        "h264" => "H.264",
        "hevc" => "HEVC",
        "vp8" => "VP8",
        "vp9" => "VP9",
        "av1" => "AV1",
        "mpeg4" => "MPEG-4 Part 2",
        "mjpeg" => "Motion JPEG",
        "prores" => "ProRes",
        _ => "other-codec",
    }
}

fn probe(tools: &FfmpegTools, file: &Path, opts: &VideoDecodeOptions) -> Result<Probe, MediaError> {
    let mut cmd = Command::new(&tools.ffprobe);
    cmd.args([
        "-v",
        "error",
        "-select_streams",
        "v:0",
        "-count_packets",
        "-show_entries",
    ])
    .arg("stream=codec_name,width,height,avg_frame_rate,r_frame_rate,nb_read_packets")
    .args(["-of", "default=noprint_wrappers=1"])
    .arg(file);
    let run = run_bounded(cmd, 64 << 10, opts.ffmpeg_timeout)?;
    let text = String::from_utf8_lossy(&run.stdout);
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::trim)
    };
    let codec = match field("codec_name") {
        Some(c) if run.status.success() => c.to_string(),
        _ if !run.status.success() => {
            return Err(MediaError::Corrupt(format!(
                "ffmpeg cannot read the video: {}",
                first_line(&run.stderr, file)
            )))
        }
        _ => {
            return Err(MediaError::Unsupported(
                "the file has no video stream".into(),
            ))
        }
    };
    let dim = |k: &str| {
        field(k)
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|&v| v > 0)
    };
    let (Some(width), Some(height)) = (dim("width"), dim("height")) else {
        return Err(MediaError::Corrupt(format!(
            "the {} video does not say its frame size",
            codec_name(&codec)
        )));
    };
    let frames = field("nb_read_packets")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let rate = |k: &str| {
        let (n, d) = field(k)?.split_once('/')?;
        let (n, d) = (n.parse::<f64>().ok()?, d.parse::<f64>().ok()?);
        (n > 0.0 && d > 0.0).then(|| n / d)
    };
    Ok(Probe {
        codec,
        width,
        height,
        frames,
        fps: rate("avg_frame_rate").or_else(|| rate("r_frame_rate")),
    })
}

/// ffmpeg's first message, without the temp file's path (it means nothing to the caller).
fn first_line(stderr: &[u8], file: &Path) -> String {
    let s = String::from_utf8_lossy(stderr).replace(&*file.to_string_lossy(), "the video");
    let line = s
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no message");
    line.chars().take(300).collect()
}

struct Run {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: ExitStatus,
}

/// Run `cmd` with its stdout capped at `max_out` bytes and its wall time at
/// `timeout`: past either it is killed and the run is an error.
fn run_bounded(mut cmd: Command, max_out: usize, timeout: Duration) -> Result<Run, MediaError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    limit_memory(&mut cmd);
    let name = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().map_err(|e| {
        MediaError::Unsupported(format!("cannot run {name} for video decoding: {e}"))
    })?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let child = Arc::new(Mutex::new(child));

    // The watchdog kills the process at the deadline unless told it is done.
    let (done, finished) = mpsc::channel::<()>();
    let watched = Arc::clone(&child);
    let watchdog = std::thread::spawn(move || {
        let late = matches!(
            finished.recv_timeout(timeout),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        if late {
            let _ = lock(&watched).kill();
        }
        late
    });
    let errs = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stderr.read(&mut buf) {
            let room = MAX_STDERR.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        kept
    });

    let mut out = Vec::new();
    let mut over = false;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) if out.len() + n > max_out => {
                over = true;
                let _ = lock(&child).kill();
                break;
            }
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    drop(stdout);
    let status = loop {
        if let Ok(Some(s)) = lock(&child).try_wait() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = done.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let stderr = errs.join().unwrap_or_default();
    if timed_out {
        return Err(MediaError::Unsupported(format!(
            "video decoding took longer than {} s and was stopped; send a shorter or smaller video",
            timeout.as_secs()
        )));
    }
    if over {
        return Err(MediaError::Corrupt(format!(
            "{name} produced more output than the picked frames"
        )));
    }
    Ok(Run {
        stdout: out,
        stderr,
        status,
    })
}

fn lock(c: &Mutex<Child>) -> std::sync::MutexGuard<'_, Child> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(unix)]
fn limit_memory(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: MAX_ADDRESS_SPACE as libc::rlim_t,
                rlim_max: MAX_ADDRESS_SPACE as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(unix))]
fn limit_memory(_cmd: &mut Command) {}

/// The video bytes in a file only this user can read, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn write(bytes: &[u8]) -> Result<TempFile, MediaError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut name = OsString::from(format!(
            "candela-video-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        name.push(".bin");
        let path = std::env::temp_dir().join(name);
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let io = |e: std::io::Error| {
            MediaError::Unsupported(format!(
                "cannot write the video to a temp file for ffmpeg: {e}"
            ))
        };
        let mut f = o.open(&path).map_err(io)?;
        let file = TempFile(path);
        std::io::Write::write_all(&mut f, bytes).map_err(io)?;
        Ok(file)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
