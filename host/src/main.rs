//! `tessera`: serve models (`tessera serve`) or build a model archive (`tessera pack`).
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tessera::archive::{self, PackSpec};
use tessera::inference::Tessera;
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

#[derive(Subcommand)]
enum Command {
    /// Serve the models of a model store over HTTP.
    Serve(Config),
    /// Build a model archive (`<name>.tar.gz`) from a config, TorchScript files, a handler
    /// component and assets; checks every piece before writing.
    Pack(PackArgs),
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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wasmtime=warn,cranelift=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve(config) => serve(config),
        Command::Pack(args) => pack(args),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let app = Tessera::new(config)?;
        let addr = std::net::SocketAddr::new(app.config.bind, app.config.port);
        app.registry.store().clean_staging();
        app.tenants.watch(std::time::Duration::from_secs(2));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        for name in app.config.preload.clone() {
            let tenant = app.tenants.authenticate(None).ok();
            let Some(tenant) = tenant else {
                tracing::warn!(
                    model = name,
                    "--preload applies to single-tenant servers only"
                );
                continue;
            };
            match app.ensure_loaded(&tenant, &name, None).await {
                Ok(_) => tracing::info!(model = name, "preloaded"),
                Err(e) => tracing::error!(model = name, error = %e, "preload failed"),
            }
        }
        // Tests and scripts read this line to find the port.
        println!("tessera listening on http://{local}");
        tracing::info!(%local, "listening");
        axum::serve(listener, http::router(app.clone()))
            .with_graceful_shutdown(shutdown())
            .await?;
        app.cleanup();
        Ok(())
    })
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
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
    sandbox::Sandbox::new()?
        .validate(&wasm)
        .context("checking the handler")?;
    if !args.skip_model_check {
        for m in &args.models {
            runtime::TorchModel::load(m, tch::Device::Cpu)
                .with_context(|| format!("checking {}", m.display()))?;
        }
    }
    let spec = PackSpec {
        config: args.config,
        models: args.models,
        handler: args.handler,
        assets: args.assets,
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
