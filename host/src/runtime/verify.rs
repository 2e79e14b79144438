//! What a tenant's TorchScript may do: tensor computation and control flow, nothing else.
//!
//! Loading a TorchScript file runs code from it (`__setstate__` methods), and its methods may
//! call any registered operator, including ones that write files (`aten::save`), read them
//! (`aten::from_file`), talk to the network (`prim::rpc_*`) or change process-wide state
//! (`aten::manual_seed` on the global generator). So before the server loads a file it is
//! checked in a child process — the `tessera` binary re-executed with [`CHILD_COMMAND`] — that
//! can do no harm: rlimits on data memory, CPU time, file size and core dumps; no capabilities;
//! Landlock forbids every filesystem write and TCP (where the kernel has it); seccomp refuses
//! sockets, process creation, exec, signals to other processes, ptrace and ownership or mode
//! changes; and the parent kills it at a deadline. The child loads each file and lists every
//! operator of every function and method; the parent accepts the file only if each is on the
//! policy's allowlist ([`refused_ops`]). The server then loads only files that passed, so
//! their `__setstate__` and forwards run nothing but allowed operators.
//!
//! This checks what a model may *call*, not how long or how much: a forward that loops is
//! stopped by the workers' quarantine, one that allocates without bound by the CPU tensor cap
//! ([`super::cap_cpu_tensor_memory`]) and the device's own limit.
use super::RuntimeError;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The hidden subcommand the child runs: `tessera __check-torchscript FILE...`.
pub const CHILD_COMMAND: &str = "__check-torchscript";

/// Operator namespaces that hold tensor computation and control flow only.
const ALLOWED_NAMESPACES: &[&str] = &["aten", "prim", "prepacked", "quantized"];

/// Operators of those namespaces (every overload) that reach outside the model or change shared
/// state.
const REFUSED_OPS: &[(&str, &str)] = &[
    ("aten::save", "writes a file"),
    ("aten::from_file", "reads or maps a file"),
    ("prim::Print", "writes to the server's stdout"),
    ("aten::_print", "writes to the server's stdout"),
    ("aten::warn", "writes to the server's log"),
    ("prim::rpc_async", "makes network calls"),
    ("prim::rpc_sync", "makes network calls"),
    ("prim::rpc_remote", "makes network calls"),
    ("prim::fork", "starts tasks outside the request"),
    ("aten::wait", "waits on tasks outside the request"),
    ("prim::awaitable", "starts tasks outside the request"),
    ("prim::awaitable_nowait", "starts tasks outside the request"),
    ("prim::awaitable_wait", "waits on tasks outside the request"),
    (
        "aten::manual_seed",
        "seeds the process-wide random generator",
    ),
    ("aten::seed", "seeds the process-wide random generator"),
    (
        "aten::_cufft_set_plan_cache_max_size",
        "changes process-wide settings",
    ),
    (
        "aten::_cufft_clear_plan_cache",
        "changes process-wide settings",
    ),
    ("prim::AddStatValue", "writes process-wide statistics"),
    ("prim::PythonOp", "calls Python"),
];

/// Overloads of refused operators that stay inside the model: seeding the model's own
/// generator (`aten::manual_seed` alone seeds the process-wide one).
const ALLOWED_OVERLOADS: &[&str] = &["aten::manual_seed.generator"];

/// Operators (as the child lists them: `ns::name` or `ns::name.overload`) the policy refuses,
/// each with the reason.
pub fn refused_ops<'a>(ops: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut refused = Vec::new();
    for op in ops {
        let base = op.split_once('.').map_or(op, |(b, _)| b);
        let listed = REFUSED_OPS
            .iter()
            .find(|(name, _)| *name == base && !ALLOWED_OVERLOADS.contains(&op));
        if let Some((_, why)) = listed {
            refused.push(format!("{op} ({why})"));
            continue;
        }
        let namespace = base.split_once("::").map(|(ns, _)| ns);
        if !namespace.is_some_and(|ns| ALLOWED_NAMESPACES.contains(&ns)) {
            refused.push(format!("{op} (not a tensor or control-flow operator)"));
        }
    }
    refused
}

/// Default base deadline of a check, in seconds (`--model-check-seconds`, `tessera pack`).
pub const DEFAULT_CHECK_SECONDS: u64 = 120;

/// Limits of one check.
#[derive(Debug, Clone, Copy)]
pub struct CheckLimits {
    /// Wall-clock time for all files of one check; the child is killed past it.
    pub deadline: Duration,
    /// The child's data memory (heap and anonymous mappings).
    pub memory_bytes: u64,
}

impl CheckLimits {
    /// Limits for checking `files`: `seconds` plus a second per 50 MB, and `memory_mib` of data
    /// memory (0: twice the files' size plus 2 GiB for libtorch itself).
    pub fn for_files(files: &[PathBuf], seconds: u64, memory_mib: u64) -> CheckLimits {
        let bytes: u64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        CheckLimits {
            deadline: Duration::from_secs(seconds + bytes / (50 << 20)),
            memory_bytes: match memory_mib {
                0 => 2 * bytes + (2 << 30),
                mib => mib << 20,
            },
        }
    }
}

/// Checks `files` in a sandboxed child (this `tessera` binary, re-executed). `Ok` only if every
/// file loads there and uses allowed operators only.
pub fn check_files(files: &[PathBuf], limits: CheckLimits) -> Result<(), RuntimeError> {
    if files.is_empty() {
        return Ok(());
    }
    let exe = std::env::current_exe().map_err(|e| {
        RuntimeError::Refused(format!("cannot find the tessera binary to check with: {e}"))
    })?;
    let passed_before = content_key(files, limits);
    if passed_before.is_some_and(|k| {
        PASSED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&k)
    }) {
        tracing::debug!(
            files = files.len(),
            "TorchScript passed its check before: same bytes, same limits"
        );
        return Ok(());
    }
    let Some(_slot) = CheckSlot::take(CHECK_QUEUE_WAIT) else {
        return Err(RuntimeError::Busy(format!(
            "every TorchScript check slot was busy for {}s (other uploads and loads are being checked); retry shortly",
            CHECK_QUEUE_WAIT.as_secs()
        )));
    };
    let started = Instant::now();
    let mut command = Command::new(&exe);
    command.arg(CHILD_COMMAND).args(files).env_clear();
    // Where the operator points the loader at libtorch (a binary without an rpath to it).
    if let Some(path) = std::env::var_os("LD_LIBRARY_PATH") {
        command.env("LD_LIBRARY_PATH", path);
    }
    let mut child = command
        .env("TESSERA_CHECK_MEMORY", limits.memory_bytes.to_string())
        .env(
            "TESSERA_CHECK_CPU_SECONDS",
            limits.deadline.as_secs().max(1).to_string(),
        )
        .env("OMP_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            RuntimeError::Refused(format!("could not start the TorchScript check: {e}"))
        })?;
    // Drain both pipes (bounded) on their own threads so a chatty child cannot block.
    let bounded = |pipe: Option<Box<dyn Read + Send>>, cap: u64| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(p) = pipe {
                let _ = p.take(cap).read_to_end(&mut out);
            }
            out
        })
    };
    let stdout = bounded(child.stdout.take().map(|p| Box::new(p) as _), 4 << 20);
    let stderr = bounded(child.stderr.take().map(|p| Box::new(p) as _), 16 << 10);
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| RuntimeError::Refused(e.to_string()))?
        {
            break Some(status);
        }
        if started.elapsed() > limits.deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = stdout.join().unwrap_or_default();
    let err = stderr.join().unwrap_or_default();
    let Some(status) = status else {
        return Err(RuntimeError::Refused(format!(
            "loading the TorchScript did not finish within {:?} (a __setstate__ that never returns?)",
            limits.deadline
        )));
    };
    // The stream must be exactly one report line per file, in order, from a child that exited
    // cleanly: a model can write to the report pipe too (through /proc/self/fd) but cannot take
    // back the child's own line, so anything more, less or out of place refuses the file.
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    let failed = |why: String| {
        Err(RuntimeError::Refused(format!(
            "{}: the TorchScript check failed: {why}",
            names.join(", ")
        )))
    };
    if !status.success() {
        return failed(describe_exit(status, &err));
    }
    let reports = match parse_reports(&out, &names) {
        Ok(r) => r,
        Err(why) => return failed(why),
    };
    for (name, r) in names.iter().zip(&reports) {
        if let Some(error) = &r.error {
            return Err(RuntimeError::Refused(format!(
                "{name} does not load as TorchScript in the sandbox: {}",
                first_lines(error)
            )));
        }
        let refused = refused_ops(r.ops.iter().map(String::as_str));
        if !refused.is_empty() {
            return Err(RuntimeError::Refused(format!(
                "{name} uses operators a model may not use: {}",
                refused.join(", ")
            )));
        }
    }
    tracing::info!(
        files = files.len(),
        ms = started.elapsed().as_millis() as u64,
        "TorchScript checked in a sandboxed process"
    );
    if let Some(k) = passed_before {
        let mut passed = PASSED.lock().unwrap_or_else(|p| p.into_inner());
        if passed.len() >= REMEMBERED_PASSES {
            passed.pop_front();
        }
        passed.push_back(k);
    }
    Ok(())
}

/// Checks that passed, by what they checked (see [`content_key`]), oldest first: the same bytes
/// under the same limits pass again (an archive uploaded again as a new version, the folder of a
/// version unpacked afresh), so they are not checked twice. A refusal is not remembered.
static PASSED: std::sync::Mutex<std::collections::VecDeque<[u8; 32]>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());
const REMEMBERED_PASSES: usize = 512;

/// The SHA-256 of `files`' bytes, in order, each with its length, and of `limits` (None if a
/// file cannot be read whole: it is then checked, and not remembered).
fn content_key(files: &[PathBuf], limits: CheckLimits) -> Option<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(limits.memory_bytes.to_le_bytes());
    h.update(limits.deadline.as_millis().to_le_bytes());
    for f in files {
        let file = std::fs::File::open(f).ok()?;
        let len = file.metadata().ok()?.len();
        h.update(len.to_le_bytes());
        for piece in piece_digests(&file, len)? {
            h.update(piece);
        }
        // A file that changed size while it was hashed has no key.
        if file.metadata().ok()?.len() != len {
            return None;
        }
    }
    Some(h.finalize().into())
}

/// Bytes hashed per piece by [`piece_digests`].
const HASH_PIECE: u64 = 32 << 20;

/// SHA-256 of each `HASH_PIECE` of `file` (`len` bytes), in order, on several threads: one
/// thread hashes about 2 GB/s, so a 2.5 GB model's key took 2 s on one. `None` if a read fails
/// or the file is shorter than `len`.
fn piece_digests(file: &std::fs::File, len: u64) -> Option<Vec<[u8; 32]>> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pieces = len.div_ceil(HASH_PIECE) as usize;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
        .min(pieces.max(1));
    let next = AtomicUsize::new(0);
    let digests = std::sync::Mutex::new(vec![None; pieces]);
    std::thread::scope(|scope| {
        let work = || {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= pieces {
                    break;
                }
                let (start, end) = (
                    i as u64 * HASH_PIECE,
                    (len).min((i as u64 + 1) * HASH_PIECE),
                );
                let mut h = Sha256::new();
                let mut at = start;
                let mut ok = true;
                while at < end {
                    let n = (end - at).min(buf.len() as u64) as usize;
                    if file.read_exact_at(&mut buf[..n], at).is_err() {
                        ok = false;
                        break;
                    }
                    h.update(&buf[..n]);
                    at += n as u64;
                }
                let digest = ok.then(|| <[u8; 32]>::from(h.finalize()));
                digests.lock().unwrap_or_else(|e| e.into_inner())[i] = digest;
                if !ok {
                    // The key fails anyway: the other threads stop at their next piece.
                    next.store(pieces, Ordering::Relaxed);
                }
            }
        };
        // Threads that cannot start leave their share to the others and to this one.
        for _ in 1..threads {
            let _ = std::thread::Builder::new().spawn_scoped(scope, work);
        }
        work();
    });
    digests
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .collect()
}

/// The child's report stream: exactly one JSON report per name, in order, each on its own
/// line, and nothing else.
fn parse_reports(out: &[u8], names: &[String]) -> Result<Vec<FileReport>, String> {
    let text = std::str::from_utf8(out).map_err(|_| "its report is not text".to_string())?;
    let lines: Vec<&str> = text
        .strip_suffix('\n')
        .unwrap_or(text)
        .split('\n')
        .collect();
    if text.is_empty() || lines.len() != names.len() {
        return Err(format!(
            "expected {} report line(s), got {} (did the model write to the report stream?)",
            names.len(),
            if text.is_empty() { 0 } else { lines.len() }
        ));
    }
    names
        .iter()
        .zip(lines)
        .map(
            |(name, line)| match serde_json::from_str::<FileReport>(line) {
                Ok(r) if &r.file == name => Ok(r),
                _ => Err(format!("the report for {name} is malformed")),
            },
        )
        .collect()
}

/// Checks running at once (each loads whole model files into memory); others wait their turn,
/// for [`CHECK_QUEUE_WAIT`] at most: past it the upload or load is refused as busy (503,
/// retryable) instead of waiting behind a flood of others without end.
const MAX_CONCURRENT_CHECKS: usize = 2;
const CHECK_QUEUE_WAIT: Duration = Duration::from_secs(30);
static RUNNING: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static FREED: std::sync::Condvar = std::sync::Condvar::new();

struct CheckSlot;
impl CheckSlot {
    /// A slot, waiting up to `wait` for one (None if none came).
    fn take(wait: Duration) -> Option<CheckSlot> {
        let until = Instant::now() + wait;
        let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        while *running >= MAX_CONCURRENT_CHECKS {
            let left = until.checked_duration_since(Instant::now())?;
            running = FREED
                .wait_timeout(running, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *running += 1;
        Some(CheckSlot)
    }
}
impl Drop for CheckSlot {
    fn drop(&mut self) {
        *RUNNING.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        FREED.notify_one();
    }
}

fn describe_exit(status: std::process::ExitStatus, stderr: &[u8]) -> String {
    use std::os::unix::process::ExitStatusExt;
    let text = String::from_utf8_lossy(stderr);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    match status.signal() {
        Some(libc::SIGXCPU) => "it used up its CPU time".into(),
        Some(libc::SIGXFSZ) => "it tried to write a file".into(),
        Some(libc::SIGKILL) => "it was killed (memory limit?)".into(),
        Some(sig) => format!("it died with signal {sig}"),
        None => format!("exit status {}: {last}", status.code().unwrap_or(-1)),
    }
}

fn first_lines(m: &str) -> String {
    m.lines()
        .filter(|l| !l.trim().is_empty())
        .take(4)
        .collect::<Vec<_>>()
        .join(" | ")
}

#[derive(serde::Serialize, serde::Deserialize)]
struct FileReport {
    file: String,
    #[serde(default)]
    ops: Vec<String>,
    #[serde(default)]
    error: Option<String>,
}

/// The child's side: confine this process, then load and list each file, one JSON line each
/// on the report stream (stdout as the child started). Returns the exit code.
///
/// Loading a file runs its `__setstate__`, and a `print` there writes to fd 1: so fd 1 is
/// pointed at stderr before any file is read, and reports go to a copy of the pipe. A model can
/// still reach that copy through /proc/self/fd; the parent's strict reading (one report line
/// per file and nothing else) is what makes a forged line harmless.
pub fn run_child(files: &[PathBuf]) -> i32 {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: plain descriptor calls on this process's own stdio, before any other thread runs;
    // the duplicate is owned by the File from here on.
    let reports = unsafe {
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            eprintln!("tessera check: cannot set up the report stream");
            return 3;
        }
        std::fs::File::from_raw_fd(fd)
    };
    if let Err(e) = confine() {
        eprintln!("tessera check: cannot confine the check process: {e}");
        return 3;
    }
    let mut out = std::io::LineWriter::new(reports);
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let report = match super::torchscript_ops(f) {
            Ok(ops) => FileReport {
                file: name,
                ops,
                error: None,
            },
            Err(e) => FileReport {
                file: name,
                ops: vec![],
                error: Some(e),
            },
        };
        let line = serde_json::to_string(&report).unwrap_or_default();
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            return 4;
        }
    }
    0
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Everything the check process gives up before it reads a model file.
fn confine() -> Result<(), String> {
    // SAFETY: plain libc calls on this process with values we own.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        let limit = |resource, value: u64| {
            let r = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &r) != 0 {
                Err(format!(
                    "setrlimit({resource}): {}",
                    std::io::Error::last_os_error()
                ))
            } else {
                Ok(())
            }
        };
        limit(libc::RLIMIT_CORE, 0)?;
        limit(libc::RLIMIT_FSIZE, 0)?;
        limit(libc::RLIMIT_DATA, env_u64("TESSERA_CHECK_MEMORY", 4 << 30))?;
        limit(libc::RLIMIT_CPU, env_u64("TESSERA_CHECK_CPU_SECONDS", 120))?;
        limit(libc::RLIMIT_NOFILE, 256)?;
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
        }
        drop_capabilities()?;
    }
    landlock_read_only()?;
    seccomp_deny()?;
    Ok(())
}

/// Clears every capability (a root server's child keeps root's uid, not its powers).
unsafe fn drop_capabilities() -> Result<(), String> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: the kernel reads one header and two data structs, laid out as capset(2) says.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(format!("capset: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Landlock: read and execute anywhere, write nowhere, no TCP; as much as the kernel supports.
fn landlock_read_only() -> Result<(), String> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, ABI,
    };
    let abi = ABI::V5;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi))))
        .and_then(|r| r.restrict_self())
        .map_err(|e| format!("landlock: {e}"))?;
    if status.ruleset == RulesetStatus::NotEnforced {
        // Old kernels: RLIMIT_FSIZE = 0, no capabilities and seccomp still stop writes.
        eprintln!("tessera check: landlock not available on this kernel");
    }
    Ok(())
}

/// seccomp: a denylist on top of everything else (the check needs threads, mmap and reads,
/// whose exact set differs between libtorch builds, so an allowlist would break on upgrades).
fn seccomp_deny() -> Result<(), String> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    use std::collections::BTreeMap;
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp arch: {e:?}"))?;
    let cond =
        |arg, len, op, value| SeccompCondition::new(arg, len, op, value).map_err(|e| e.to_string());
    let pid = std::process::id() as u64;
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in [
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_kill,
        libc::SYS_tkill,
        libc::SYS_pidfd_open,
        libc::SYS_pidfd_send_signal,
        libc::SYS_pidfd_getfd,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_io_uring_setup,
        libc::SYS_chmod,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_chown,
        libc::SYS_fchown,
        libc::SYS_lchown,
        libc::SYS_fchownat,
        libc::SYS_mknod,
        libc::SYS_mknodat,
        libc::SYS_setxattr,
        libc::SYS_lsetxattr,
        libc::SYS_fsetxattr,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
    ] {
        deny.insert(nr, vec![]);
    }
    // New processes no; new threads (CLONE_THREAD) yes.
    deny.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![cond(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            0,
        )?])
        .map_err(|e| e.to_string())?],
    );
    // Signals to this process only.
    deny.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![cond(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            pid,
        )?])
        .map_err(|e| e.to_string())?],
    );
    let filter = SeccompFilter::new(
        deny,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    // clone3 cannot be filtered by its flags (they are behind a pointer): answer ENOSYS so the
    // C library falls back to clone(2), which the rule above filters.
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    for f in [filter, clone3] {
        let program: seccompiler::BpfProgram = f
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())?;
        seccompiler::apply_filter(&program).map_err(|e| format!("seccomp: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_passed_before_is_not_run_again_for_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.pt");
        std::fs::write(&file, b"the model's bytes").unwrap();
        let files = [file.clone()];
        let limits = CheckLimits {
            deadline: Duration::from_secs(20),
            memory_bytes: 1 << 30,
        };
        let refused = |r: Result<(), RuntimeError>| matches!(r, Err(RuntimeError::Refused(_)));
        let key = content_key(&files, limits).unwrap();
        // Never passed: the check runs (this test binary is no tessera, so it is refused), and
        // a refusal is not remembered.
        assert!(refused(check_files(&files, limits)));
        assert!(!PASSED.lock().unwrap().contains(&key));
        // Passed before (as a real check records it): not run again.
        PASSED.lock().unwrap().push_back(key);
        assert!(check_files(&files, limits).is_ok());
        // Other limits, or other bytes of the same length: checked again.
        let other_limits = CheckLimits {
            memory_bytes: 2 << 30,
            ..limits
        };
        assert!(refused(check_files(&files, other_limits)));
        std::fs::write(&file, b"the model's bytez").unwrap();
        assert_ne!(content_key(&files, limits), Some(key));
        assert!(refused(check_files(&files, limits)));
    }

    #[test]
    fn policy_allows_tensor_ops_and_refuses_the_rest() {
        let ok = [
            "aten::conv2d",
            "aten::add.Tensor",
            "prim::Loop",
            "prim::If",
            "prim::CallMethod",
            "aten::manual_seed.generator",
            "prepacked::conv2d_clamp_run",
        ];
        assert!(refused_ops(ok).is_empty(), "{:?}", refused_ops(ok));
        for bad in [
            "aten::save",
            "aten::from_file",
            "prim::Print",
            "aten::manual_seed",
            "prim::rpc_async",
            "myops::evil",
            "<opaque function f>",
            "cuda::set_stream",
            "aten::save.other_overload",
            "aten::manual_seed.other",
        ] {
            assert_eq!(refused_ops([bad]).len(), 1, "{bad} should be refused");
        }
    }
}
