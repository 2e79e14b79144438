//! `tessera`: serve models (`tessera serve`) or build a model archive (`tessera pack`).
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera::archive::{self, PackSpec};
use tessera::serving::Server;
use tessera::{http, runtime, sandbox, store, Config};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Multi-model inference host with Wasm handlers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of `Config` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve the models of a model store over HTTP.
    Serve(Config),
    /// Build a model archive (`<name>.tar.gz`) from a config, TorchScript files, a handler
    /// component and assets; checks every piece before writing.
    Pack(PackArgs),
    /// Internal: the sandboxed child that lists a TorchScript file's operators.
    #[command(name = runtime::verify::CHILD_COMMAND, hide = true)]
    CheckTorchscript { files: Vec<PathBuf> },
}

#[derive(clap::Args)]
struct PackArgs {
    /// model-config.yaml
    #[arg(long)]
    config: PathBuf,
    /// TorchScript file(s); repeat for several.
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// The handler component (wasm32-wasip2).
    #[arg(long)]
    handler: PathBuf,
    /// Files or folders to ship under assets/; repeat for several.
    #[arg(long = "asset")]
    assets: Vec<PathBuf>,
    /// Output archive, `<model name>.tar.gz`.
    #[arg(long, short)]
    output: PathBuf,
    /// Skip loading the TorchScript files to check them (for files too big to load here).
    #[arg(long)]
    skip_model_check: bool,
    /// How the archive is compressed (always a standard .tar.gz): `none` stores the bytes
    /// (weights barely compress, and a first load then unpacks at copy speed), `fast` / `best`
    /// are gzip levels 1 / 9 (smaller archives, single-threaded inflate at every first load).
    #[arg(long, value_enum, default_value_t = archive::PackCompression::None)]
    compression: archive::PackCompression,
}

fn main() -> anyhow::Result<()> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Command::CheckTorchscript { files } = &cli.command {
        std::process::exit(runtime::verify::run_child(files));
    }
    if let (Command::Serve(config), Some(serve)) =
        (&mut cli.command, matches.subcommand_matches("serve"))
    {
        // Settings the operator gave (flag or environment) stay as given.
        config.apply_sagemaker(
            |id| {
                matches!(
                    serve.value_source(id),
                    Some(
                        clap::parser::ValueSource::CommandLine
                            | clap::parser::ValueSource::EnvVariable
                    )
                )
            },
            |k| std::env::var(k).ok(),
        );
    }
    let json = matches!(&cli.command, Command::Serve(c) if c.log_format == tessera::config::LogFormat::Json);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,wasmtime=warn,cranelift=warn".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match cli.command {
        Command::Serve(config) => serve(config),
        Command::Pack(args) => pack(args),
        Command::CheckTorchscript { .. } => unreachable!("handled above"),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    // A client's damaged image can panic a third-party decoder; host imaging contains that (the
    // image's 400), so such panics are not echoed to stderr once per hostile request.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info
            .location()
            .is_some_and(|l| tessera_imaging::panic_is_contained(l.file()))
        {
            report(info)
        }
    }));
    // libtorch reads its allocator settings once, when CUDA starts: set them while this is
    // the only thread.
    if config.cuda_alloc_conf.is_empty() {
        std::env::remove_var("PYTORCH_CUDA_ALLOC_CONF");
    } else {
        std::env::set_var("PYTORCH_CUDA_ALLOC_CONF", &config.cuda_alloc_conf);
    }
    // Fixed before any forward thread sets its own count (libtorch seeds new threads' counts
    // from the last one set).
    let intra_op =
        runtime::init_default_intra_op_threads(config.intra_op_threads.map(|n| n as usize));
    tracing::info!(
        intra_op_threads = intra_op,
        "CPU models' ops use this many threads each unless a model's config says otherwise (GPU models: 1)"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let app = Server::new(config)?;
        let addr = std::net::SocketAddr::new(app.config.bind, app.config.port);
        app.registry.store().clean_staging();
        app.tenants.watch(std::time::Duration::from_secs(2));
        {
            let app = app.clone();
            tokio::spawn(async move {
                let mut upkeep = tessera::residency::Upkeep::default();
                let store = app.registry.store().clone();
                let store_readable: Arc<dyn Fn() -> bool + Send + Sync> =
                    Arc::new(move || store.check_readable().is_ok());
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    app.residency
                        .upkeep(&mut upkeep, Duration::from_secs(60), store_readable.clone())
                        .await;
                }
            });
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        let fd_limit = http::conn::raise_fd_limit();
        let limits = http::conn::ConnLimits {
            header_timeout: Duration::from_secs(app.config.header_timeout_seconds),
            body_stall: Duration::from_secs(app.config.body_stall_seconds),
            max_connections: match app.config.max_connections {
                0 => http::conn::default_max_connections(fd_limit),
                n => n,
            },
        };
        tracing::info!(fd_limit, max_connections = limits.max_connections,
            header_timeout_s = app.config.header_timeout_seconds,
            body_stall_s = app.config.body_stall_seconds, "connection limits");
        // Every listener stops taking connections together, when the drain starts.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        if let Some(maddr) = app.config.metrics_address {
            let metrics = tokio::net::TcpListener::bind(maddr)
                .await
                .with_context(|| format!("binding the metrics address {maddr}"))?;
            let at = metrics.local_addr()?;
            println!("tessera metrics on http://{at}/metrics");
            if at.ip().is_loopback() {
                tracing::info!(%at, "metrics served without a token");
            } else {
                tracing::warn!(%at, "metrics served without a token beyond loopback: they name every tenant's models; bind it where only the scraper reaches");
            }
            let router = http::metrics_router(app.clone());
            let stop = stopped(stop_rx.clone());
            tokio::spawn(http::conn::serve(metrics, router, limits, stop));
        }
        if let Some(maddr) = app.config.management_address {
            tessera::tenancy::check_bind(maddr.ip(), &app.tenants).map_err(anyhow::Error::msg)?;
            let mgmt = tokio::net::TcpListener::bind(maddr)
                .await
                .with_context(|| format!("binding the management address {maddr}"))?;
            let at = mgmt.local_addr()?;
            println!("tessera management (TorchServe API) on http://{at}");
            tracing::info!(%at, "TorchServe management API");
            let router = http::torchserve::router(app.clone());
            let stop = stopped(stop_rx.clone());
            tokio::spawn(http::conn::serve(mgmt, router, limits, stop));
        }
        tracing::info!(mode = ?app.tenants.mode(), sagemaker = app.config.sagemaker,
            "auth: {}", app.tenants.describe());
        print_banner(&app, local);
        // Tests and scripts read this line to find the port; health answers from now on,
        // readiness once the preloads below are warm ("tessera ready").
        println!("tessera listening on http://{local}");
        tracing::info!(%local, "listening");
        let signalled = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(shutdown(signalled.clone(), app.clone(), stop_tx));
        let serve = http::conn::serve(
            listener,
            http::router(app.clone()),
            limits,
            stopped(stop_rx.clone()),
        );
        let preloads = app.clone();
        tokio::spawn(async move {
            for name in preloads.config.preload.clone() {
                let tenant = preloads
                    .tenants
                    .authenticate_for(None, tessera::tenancy::Scope::Inference)
                    .ok();
                let Some(tenant) = tenant.filter(|_| !preloads.tenants.multi_tenant()) else {
                    tracing::warn!(
                        model = name,
                        "--preload applies to single-tenant servers only"
                    );
                    continue;
                };
                // A moment's refusal (every check slot busy with clients' uploads) is retried.
                let mut tries = 0;
                loop {
                    tries += 1;
                    match preloads.ensure_loaded(&tenant, &name, None).await {
                        Ok(_) => tracing::info!(model = name, "preloaded"),
                        Err(e) if e.kind == tessera::ErrorKind::Unavailable && tries < 10 => {
                            tracing::warn!(model = name, error = %e, "preload refused for now: retrying");
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            continue;
                        }
                        Err(e) => tracing::error!(model = name, error = %e, "preload failed"),
                    }
                    break;
                }
            }
            preloads.set_ready();
            println!("tessera ready");
            tracing::info!("ready");
        });
        let drain = Duration::from_secs(app.config.drain_seconds);
        let mut deadline = None;
        tokio::select! {
            _ = serve => {},
            _ = async {
                signalled.notified().await;
                deadline = Some(Instant::now() + drain);
                tokio::time::sleep(drain).await;
            } => tracing::warn!(drain_s = drain.as_secs(),
                "requests still in flight at the drain deadline are cut off"),
        }
        // Queued forwards finish and every forward thread exits before the process does: a
        // libtorch forward still running while the process tears down can crash it.
        let deadline = deadline.unwrap_or_else(|| Instant::now() + drain);
        let server = app.clone();
        let running = tokio::task::spawn_blocking(move || server.residency.shutdown(deadline))
            .await
            .unwrap_or(0);
        app.cleanup();
        if running > 0 {
            tracing::error!(running, "forward threads still running at the drain deadline; exiting without running libtorch's teardown");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().flush();
            // SAFETY: ends the process at once; nothing after this runs.
            unsafe { libc::_exit(0) };
        }
        tracing::info!("drained: forward threads joined; exiting");
        Ok(())
    })
}

/// What a newcomer needs to see at start: what is served, where, on which device.
fn print_banner(app: &Server, local: std::net::SocketAddr) {
    let store = &app.config.model_store;
    let shown = store.canonicalize().unwrap_or_else(|_| store.clone());
    let archives = app.registry.store().list().unwrap_or_default();
    let listed = match archives.len() {
        0 => "no archives yet: add <name>.tar.gz files (tessera pack) or upload versions".into(),
        n if n <= 12 => format!("{n} archive(s): {}", archives.join(", ")),
        n => format!("{n} archives: {}, ...", archives[..12].join(", ")),
    };
    let tenancy = app.tenants.describe();
    println!("tessera {}", env!("CARGO_PKG_VERSION"));
    println!("  model store  {} ({listed})", shown.display());
    println!(
        "  device       {}, residency budget {} MiB",
        runtime::device_name(app.residency.device()),
        app.residency.budget() >> 20
    );
    println!("  tenants      {tenancy}");
    println!(
        "  try          curl http://{local}/models   |   POST http://{local}/predictions/<model>"
    );
}

/// On SIGTERM or Ctrl-C: marks the server draining (not ready), waits `--drain-delay-seconds`,
/// then tells every listener to stop taking connections (axum waits for those in flight) and
/// `signalled`, which starts the drain deadline.
async fn shutdown(
    signalled: Arc<tokio::sync::Notify>,
    app: Arc<Server>,
    stop: tokio::sync::watch::Sender<bool>,
) {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    // Readiness answers 503 from now on; connections are still taken for --drain-delay-seconds
    // so that a load balancer sees it and stops sending before they are refused.
    app.begin_drain();
    let delay = Duration::from_secs(app.config.drain_delay_seconds);
    if !delay.is_zero() {
        tracing::info!(
            delay_s = delay.as_secs(),
            "shutting down: not ready; still serving until the load balancer notices"
        );
        tokio::time::sleep(delay).await;
    }
    tracing::info!("shutting down: draining requests in flight");
    let _ = stop.send(true);
    signalled.notify_one();
}

fn pack(args: PackArgs) -> anyhow::Result<()> {
    let file = args
        .output
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let name = file.strip_suffix(store::ARCHIVE_SUFFIX).with_context(|| {
        format!(
            "output '{file}' must be named <model>{}",
            store::ARCHIVE_SUFFIX
        )
    })?;
    store::validate_name(name)?;
    let wasm = std::fs::read(&args.handler)
        .with_context(|| format!("reading {}", args.handler.display()))?;
    sandbox::Sandbox::new(tessera::config::ram_bytes() / 4)?
        .validate(&wasm)
        .context("checking the handler")?;
    if !args.skip_model_check {
        let limits = runtime::verify::CheckLimits::for_files(
            &args.models,
            runtime::verify::DEFAULT_CHECK_SECONDS,
            0,
        );
        runtime::verify::check_files(&args.models, limits).context("checking the TorchScript")?;
    }
    let spec = PackSpec {
        config: args.config,
        models: args.models,
        handler: args.handler,
        assets: args.assets,
        compression: args.compression,
    };
    archive::pack(&spec, &args.output)?;
    let size = std::fs::metadata(&args.output)?.len();
    println!(
        "packed {} ({:.1} MiB)",
        args.output.display(),
        size as f64 / (1 << 20) as f64
    );
    Ok(())
}
