//! The `vestibule` command: a thin shell over the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use vestibule::config::{Config, LogConfig};
use vestibule::token::{generate_key, random_id, unix_now, KeyKind, Tokens};
use vestibule::{demo, loadtest, server, telemetry};

// The proxy allocates and frees small buffers for every request, which mimalloc does in fewer
// instructions than glibc's allocator (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "vestibule", version, about = "A virtual waiting room in front of your checkout")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default, with ./proxy.toml).
    Run {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// A complete local setup: the gate in front of a built-in demo shop, no Redis.
    Demo {
        /// Where the demo listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the demo's admin API and dashboard listen.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
    },
    /// Print a fresh signing key (PEM) on standard output, or write it to a file.
    Keygen {
        #[arg(long, value_enum, default_value = "eddsa")]
        alg: KeyKind,
        /// Write the key to this file (mode 0600) instead; a file already there is kept, so
        /// that a container's start can make the key once.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// GET a URL and exit 0 on a 2xx answer: a container's health check, with no curl needed.
    Probe {
        /// An http:// URL, e.g. http://127.0.0.1:9090/healthz.
        url: http::Uri,
        /// Time allowed for the whole request.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print a shell completion script (e.g. `vestibule completions bash > /etc/bash_completion.d/vestibule`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `vestibule man > /usr/local/share/man/man1/vestibule.1`.
    Man,
    /// Mint an admission token with the configured key (for testing and benchmarks).
    Token {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// The room the token admits to.
        #[arg(long)]
        room: String,
        /// Visitor id (`sub`); random by default.
        #[arg(long)]
        visitor: Option<String>,
        /// Lifetime in seconds; the room's `session_seconds` by default.
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// An open-loop crowd against a running vestibule: joins, feeds, admissions, a report.
    Loadtest(Box<loadtest::cli::Args>),
    /// Serve the demo shop alone, as an upstream (for trying the gate and for benchmarks).
    Shop {
        #[arg(long, default_value = "127.0.0.1:3000")]
        listen: SocketAddr,
        /// Runtime worker threads; default one per core.
        #[arg(long)]
        workers: Option<usize>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line an operator can act on, not a backtrace.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Run { config: PathBuf::from("proxy.toml") }) {
        Command::Run { config: path } => {
            let mut config = Config::load(&path)?;
            config.resolve_secrets()?;
            // A key that cannot be used is said with the file it is configured in.
            Tokens::new(&config.tokens).map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
            telemetry::init(&config.log);
            server::fit_descriptor_limit(&mut config);
            runtime(config.server.workers.map(|n| n.get()))?.block_on(serve(config))
        }
        Command::Check { config: path } => {
            let config = Config::load(&path)?;
            let checked =
                vestibule::check::check(&config).map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
            println!("{}: ok", path.display());
            for line in checked.loaded {
                println!("  {line}");
            }
            for warning in checked.warnings {
                eprintln!("warning: {warning}");
            }
            Ok(())
        }
        Command::Demo { listen, admin } => {
            telemetry::init(&LogConfig::default());
            runtime(None)?.block_on(run_demo(listen, admin))
        }
        Command::Keygen { alg, out: None } => {
            keep_stdout_private()?;
            print!("{}", generate_key(alg));
            Ok(())
        }
        Command::Keygen { alg, out: Some(path) } => write_key(&path, alg),
        Command::Probe { url, timeout } => runtime(Some(1))?.block_on(probe(url, timeout)),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "vestibule", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Token { config, room, visitor, ttl } => {
            let config = Config::load(&config)?;
            let Some(room_config) = config.rooms.iter().find(|r| r.id == room) else {
                anyhow::bail!("no room {room:?} in the configuration");
            };
            let tokens = Tokens::new(&config.tokens)?;
            let lifetime = Duration::from_secs(ttl.unwrap_or(room_config.session_seconds));
            let visitor = visitor.unwrap_or_else(random_id);
            // Ticket 0: a token outside any session, for tests and benchmarks.
            println!("{}", tokens.mint(&room, &visitor, 0, 0, unix_now() + lifetime.as_secs())?);
            Ok(())
        }
        Command::Loadtest(args) => runtime(None)?.block_on(args.run()),
        Command::Shop { listen, workers } => runtime(workers)?.block_on(async move {
            let signals = Signals::install();
            let stop = CancellationToken::new();
            let addr = demo::start_shop(listen, stop.clone()).await?;
            println!("demo shop on http://{addr}/");
            signals.stopped(None).await;
            stop.cancel();
            Ok(())
        }),
    }
}

/// `keygen > file`: the shell made the file with its umask (often 0644, readable by all);
/// a private key written into a regular file there is made the owner's alone first, as
/// `--out` makes its file. A pipe or a terminal is left as it is.
fn keep_stdout_private() -> anyhow::Result<()> {
    use rustix::fs::{fchmod, fstat, FileType, Mode};
    use std::os::fd::AsFd;
    let stdout = std::io::stdout();
    let fd = stdout.as_fd();
    let Ok(stat) = fstat(fd) else { return Ok(()) };
    if FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile {
        fchmod(fd, Mode::from_raw_mode(0o600)).context("cannot make the key file readable by its owner only")?;
    }
    Ok(())
}

/// `keygen --out`: a new key in a new file, readable by its owner only; an existing file is kept.
fn write_key(path: &Path, alg: KeyKind) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(folder) = path.parent().filter(|folder| !folder.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder).with_context(|| format!("cannot create {}", folder.display()))?;
    }
    let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
    match file {
        Ok(mut file) => {
            file.write_all(generate_key(alg).as_bytes())
                .with_context(|| format!("cannot write the key to {}", path.display()))?;
            eprintln!("wrote a new signing key to {}", path.display());
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            eprintln!("kept the signing key already at {}", path.display());
            Ok(())
        }
        Err(error) => Err(error).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// `probe URL`: one GET over a fresh connection; a 2xx answer is success.
async fn probe(url: http::Uri, timeout: Duration) -> anyhow::Result<()> {
    let request = async {
        anyhow::ensure!(url.scheme_str() == Some("http"), "probe takes an http:// URL, not {url}");
        let authority = url.authority().context("the URL has no host")?.clone();
        let port = authority.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((authority.host().trim_matches(['[', ']']), port)).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let request = http::Request::get(path)
            .header(http::header::HOST, authority.as_str())
            .header(http::header::USER_AGENT, "vestibule-probe")
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        Ok(sender.send_request(request).await?.status())
    };
    let status = tokio::time::timeout(timeout, request)
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer within {timeout:?}"))?
        .with_context(|| format!("{url}"))?;
    anyhow::ensure!(status.is_success(), "{url}: {status}");
    println!("{url}: {status}");
    Ok(())
}

/// The tokio runtime. With one worker, a current-thread runtime does the same work without the
/// multi-thread scheduler's cross-thread bookkeeping (`benches/admitted.sh` compares them).
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if workers == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    Ok(builder.build()?)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let signals = Signals::install();
    let running = server::start(&config).await?;
    signals.stopped(Some(running.gate())).await;
    running.shutdown();
    running.stopped().await;
    Ok(())
}

async fn run_demo(listen: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
    let signals = Signals::install();
    let stop = CancellationToken::new();
    let shop = demo::start_shop("127.0.0.1:0".parse()?, stop.clone()).await?;
    let dir = std::env::temp_dir().join(format!("vestibule-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("signing-key.pem");
    std::fs::write(&key, generate_key(KeyKind::Eddsa)).context("cannot write the demo key")?;
    // Written to a file, so that a reload (SIGHUP, or the dashboard's button) reads it again.
    let admin_token = random_id();
    let config_path = dir.join("proxy.toml");
    std::fs::write(&config_path, demo_config(listen, admin, &admin_token, shop, &key))
        .context("cannot write the demo configuration")?;
    let config = Config::load(&config_path)?;
    let running = server::start(&config).await?;
    let url = format!("http://{}", running.addr);
    let admin_url = running.admin.map(|addr| format!("http://{addr}")).unwrap_or_default();
    println!("\nvestibule demo: a waiting room in front of a small shop\n");
    println!("  shop        {url}/");
    println!("  checkout    {url}/checkout   (the room: 3 visitors a minute, 2 at a time)\n");
    println!("Open the checkout, then open it again in a private window or another browser:");
    println!("the second visitor waits in line, watches their place, and is let in when their");
    println!("turn comes. Placing an order ends a session and frees a place at once.\n");
    println!("  status      curl '{url}/_vestibule/status?room=checkout'");
    println!("  public keys {url}/.well-known/jwks.json\n");
    println!("The operator's side:");
    println!("  dashboard   {admin_url}/   (token {admin_token})");
    println!("  metrics     curl {admin_url}/metrics");
    println!("  pause       curl -X PATCH -H 'Authorization: Bearer {admin_token}' -d '{{\"state\":\"paused\"}}' {admin_url}/rooms/checkout");
    println!("  config      {} (edit, then: kill -HUP {})\n", config_path.display(), std::process::id());
    println!("Ctrl-C to stop.");
    signals.stopped(Some(running.gate())).await;
    running.shutdown();
    running.stopped().await;
    stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn demo_config(listen: SocketAddr, admin: SocketAddr, admin_token: &str, shop: SocketAddr, key: &Path) -> String {
    format!(
        r#"# The vestibule demo's configuration: edit it and send SIGHUP to apply it live.
[server]
listen = "{listen}"
shutdown_grace = "2s"
[admin]
listen = "{admin}"
token = "{admin_token}"
[upstream]
url = "http://{shop}"
[tokens]
signing_key = {key:?}
[[rooms]]
id = "checkout"
paths = ["/checkout"]
admit_per_minute = 3
max_active = 2
session_seconds = 180
site_name = "Demo shop"
title = "Checkout"
message = "This is the vestibule demo: visitors are let in three a minute, two at a time."
"#
    )
}

/// The signals an instance answers: Ctrl-C and SIGTERM stop it, SIGHUP reloads its
/// configuration. Installed before the listeners open, so that a signal sent as soon as the
/// instance says it listens is never taken with its default action (SIGHUP would end it).
struct Signals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Signals { terminate: signal(SignalKind::terminate()).ok(), hangup: signal(SignalKind::hangup()).ok() }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Wait for Ctrl-C or SIGTERM. Meanwhile each SIGHUP reads the configuration of `gate`
    /// again and applies it (a file that does not validate is refused, and logged).
    async fn stopped(mut self, gate: Option<&std::sync::Arc<vestibule::gate::Gate>>) {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let (terminate, reloads) = {
            let terminate = async {
                match self.terminate.as_mut() {
                    Some(signal) => drop(signal.recv().await),
                    None => std::future::pending::<()>().await,
                }
            };
            let reloads = async {
                match (self.hangup.as_mut(), gate) {
                    (Some(hangup), Some(gate)) => {
                        while hangup.recv().await.is_some() {
                            tracing::info!("SIGHUP: reading the configuration again");
                            // Refusals are logged by the reload itself.
                            let _ = gate.reload_from_source();
                        }
                    }
                    // Without a configuration to read again, SIGHUP does nothing.
                    (Some(hangup), None) => while hangup.recv().await.is_some() {},
                    (None, _) => {}
                }
                std::future::pending::<()>().await
            };
            (terminate, reloads)
        };
        #[cfg(not(unix))]
        let (terminate, reloads) = (std::future::pending::<()>(), std::future::pending::<()>());
        tokio::select! {
            () = ctrl_c => {}
            () = terminate => {}
            () = reloads => {}
        }
        tracing::info!("stop signal received");
    }
}
