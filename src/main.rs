//! `siterelay` command line.

// The command line needs no unsafe code (libc calls are in the library's `sys` module).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

use siterelay::client::{MllpClient, split_messages};
use siterelay::config::{self, DEFAULT_CONFIG_PATH, LogConfig, LogOutput, Timestamps};

#[derive(Parser)]
#[command(
    name = "siterelay",
    version,
    about = "HL7 v2 / device edge relay: MLLP and serial in, durable SQLite outbox, mutual-TLS MQTT out"
)]
struct Cli {
    /// Configuration file (used by run, check-config, status, metrics, enrol and queue). May be given
    /// before or after the subcommand.
    #[arg(
        long,
        global = true,
        env = "SITERELAY_CONFIG",
        default_value = DEFAULT_CONFIG_PATH,
        value_name = "FILE"
    )]
    config: PathBuf,
    /// Print JSON instead of text (status, queue, watch): one flag for every command that has
    /// a JSON form, before or after the subcommand.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run,
    /// Check a configuration file and this machine exactly as start-up does (TLS files, their
    /// dates and pairing, the data directory, listeners, serial devices), listing every problem:
    /// exit 1 on any error (start-up would refuse), 0 when there are only warnings.
    CheckConfig,
    /// Send HL7 messages from files over MLLP and print each ACK. Exit 0 when every message is
    /// accepted: AA (application accept) or CA (commit accept: stored, as siterelay answers
    /// when the sender asks for enhanced acknowledgement with MSH-15); exit 1 on any AE, AR, CE
    /// or CR, or when an ACK does not come.
    Send {
        /// Destination, HOST:PORT.
        #[arg(long)]
        to: String,
        /// Seconds to wait for each ACK.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
        /// Files holding one or more messages (segments separated by CR, LF or CRLF; each
        /// message starts with MSH), or MLLP-framed bytes.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        tls: siterelay::client::SendTlsArgs,
    },
    /// This appliance's state, from the running daemon (or from the outbox file if it is down).
    ///
    /// Exit codes, for monitoring (Nagios-style): 0 healthy; 1 degraded (the broker is not
    /// connected, records are held, a damaged store moved aside at start is not salvaged, or a
    /// certificate expires within 14 days or has expired);
    /// 3 the daemon is not answering (down), or the configuration cannot be read.
    Status,
    /// The health report as Prometheus text (node_exporter's textfile collector): the same
    /// figures as `status`, plus each feed's queue depth. Exit 0 when the daemon answered; 3
    /// when it did not (the output then says siterelay_up 0).
    Metrics {
        /// Write to this file instead of stdout, atomically (a temporary file in the same
        /// directory, renamed), as the textfile collector needs: e.g.
        /// /var/lib/prometheus/node-exporter/siterelay.prom.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Watch a fleet of appliances through the central broker (central team's view).
    Watch(siterelay::watch::WatchArgs),
    /// Make this box's MQTT client key and certificate request (CN = appliance_id, clientAuth;
    /// the key is written to mqtt.key_file, mode 0600, never printed), or with --install-cert
    /// check the certificate the central team signed and install it with its CA. See
    /// docs/operations.md, "Enrolling a box".
    Enrol(siterelay::enrol::EnrolArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout; the
    /// Debian package installs the bash, zsh and fish ones.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (siterelay(8), one siterelay-COMMAND(8) per command, and
    /// siterelay.toml(5) from the configuration reference) into a directory (packaging).
    #[command(hide = true)]
    Manpages {
        /// Directory to write them to (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Inspect the outbox.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
}

#[derive(Subcommand)]
enum RejectedCommand {
    /// List quarantined messages (metadata only).
    List,
    /// Show one quarantined message's metadata and text (contains patient data).
    Show {
        /// Quarantine id.
        id: i64,
        /// Print the sender's bytes as they are, escape sequences included (by default control
        /// characters are shown escaped, e.g. `\x1b`, so a message cannot drive the terminal).
        #[arg(long)]
        raw: bool,
    },
    /// Write one quarantined message's bytes, exactly as received, to a file.
    Export {
        /// Quarantine id.
        id: i64,
        /// Output file (created with mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Pass quarantined messages through the intake again (after a configuration change):
    /// those that now pass become ordinary records with new seq numbers and "reprocessed": true.
    Retry {
        /// Quarantine id.
        id: Option<i64>,
        /// Every quarantined message.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

#[derive(Subcommand)]
enum HeldCommand {
    /// List held records (metadata only): feed, seq, why, since when.
    List,
    /// Show one held record's metadata and text (contains patient data).
    Show {
        /// Row id (the ROW column of `list`).
        id: i64,
        /// Print the sender's bytes as they are, escape sequences included (by default control
        /// characters are shown escaped, e.g. `\x1b`, so a message cannot drive the terminal).
        #[arg(long)]
        raw: bool,
    },
    /// Write one held record's message bytes, exactly as received, to a file.
    Export {
        /// Row id.
        id: i64,
        /// Output file (created with mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Release held records after the cause is fixed (the broker's limit raised, its ACL
    /// corrected, siterelay upgraded): they are published at once with their original id and
    /// seq; one that still cannot be published is held again. Needs the daemon running.
    Retry {
        /// Row id.
        id: Option<i64>,
        /// Every held record.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// Seconds to wait for each released record to be delivered or held again.
        #[arg(long, default_value_t = 15)]
        wait_secs: u64,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Records set aside because they cannot be published as they are (too large for the MQTT
    /// packet limit, refused by the broker for good, or unbuildable); kept until released.
    Held {
        #[command(subcommand)]
        command: Option<HeldCommand>,
    },
    /// Messages answered AE (unusable content), kept in quarantine instead of being forwarded.
    Rejected {
        #[command(subcommand)]
        command: Option<RejectedCommand>,
    },
    /// Per feed: pending, delivered, oldest pending age, bytes. Safe while the daemon runs.
    Stats,
    /// Read what can still be read from a damaged store (one the daemon moved to
    /// DATA_DIR/damaged/ at start) and write each message the broker never confirmed, bytes
    /// exactly as received, to a file, with index.json. The file is never modified (a copy is
    /// read). Exit 0: everything read; 1: some rows unreadable; 2: not a file, or no output.
    Salvage {
        /// The damaged store (e.g. /var/lib/siterelay/damaged/20261203T081500Z/outbox.sqlite).
        file: PathBuf,
        /// Output directory (created 0700; files 0600: patient data). Default: `salvaged/`
        /// next to FILE.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.config;
    let json = cli.json;
    match cli.command {
        Command::Run => run(&config),
        Command::CheckConfig => check_config(&config),
        Command::Send {
            to,
            timeout_secs,
            files,
            tls,
        } => send(&to, Duration::from_secs(timeout_secs), &files, &tls),
        Command::Queue {
            command: QueueCommand::Stats,
        } => queue_stats(&config, json),
        Command::Queue {
            command: QueueCommand::Salvage { file, out },
        } => salvage(&file, out, json),
        Command::Queue {
            command: QueueCommand::Rejected { command },
        } => rejected(&config, json, command.unwrap_or(RejectedCommand::List)),
        Command::Queue {
            command: QueueCommand::Held { command },
        } => held(&config, json, command.unwrap_or(HeldCommand::List)),
        Command::Status => status(&config, json),
        Command::Enrol(args) => siterelay::enrol::cli(&config, &args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            // Without the hidden packaging command (clap_complete would offer it).
            let mut cmd = siterelay::manpage::without_hidden_subcommands(&Cli::command());
            clap_complete::generate(shell, &mut cmd, "siterelay", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Manpages { out } => {
            use clap::CommandFactory;
            match siterelay::manpage::write_all(Cli::command(), &out) {
                Ok(files) => {
                    for f in files {
                        println!("{}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", out.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Metrics { out } => metrics(&config, out.as_deref()),
        Command::Watch(mut args) => {
            args.json = json;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            match rt.block_on(siterelay::watch::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("siterelay watch: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Load the configuration for a command, printing the problems if it is not usable.
fn load_or_report(path: &Path) -> Option<config::Config> {
    match config::load(path) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("{e}");
            None
        }
    }
}

/// A single-threaded runtime for the short-lived client commands.
fn small_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn check_config(path: &Path) -> ExitCode {
    let checked = siterelay::preflight::check_file(path);
    for line in checked.lines() {
        eprintln!("{line}");
    }
    let (errors, warnings) = (checked.errors.len(), checked.warnings.len());
    match &checked.config {
        Some(cfg) => {
            println!(
                "{}: OK ({} MLLP feed(s), {} serial port(s), broker {}:{}){}",
                path.display(),
                cfg.mllp.len(),
                cfg.serial.len(),
                cfg.mqtt.host,
                cfg.mqtt.port,
                if warnings > 0 {
                    format!(", {warnings} warning(s)")
                } else {
                    String::new()
                }
            );
            ExitCode::SUCCESS
        }
        None => {
            eprintln!(
                "{errors} error(s), {warnings} warning(s): siterelay run would refuse this configuration; see docs/configuration.md"
            );
            ExitCode::FAILURE
        }
    }
}

fn init_logging(log: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let filter = || {
        EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(&log.level))
            .unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let want_journald = match log.output {
        LogOutput::Auto => under_systemd,
        LogOutput::Journald => true,
        LogOutput::Stderr => false,
    };
    if want_journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer.with_syslog_identifier("siterelay".into()))
                    .init();
                return;
            }
            Err(e) => eprintln!("journald unavailable ({e}); logging to stderr"),
        }
    }
    let with_time = match log.timestamps {
        Timestamps::Always => true,
        Timestamps::Never => false,
        Timestamps::Auto => !under_systemd,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(!under_systemd && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if with_time {
        builder.init();
    } else {
        builder.without_time().init();
    }
}

fn run(path: &Path) -> ExitCode {
    // The checks check-config prints: what they refuse, start-up refuses.
    let checked = siterelay::preflight::check_file(path);
    let Some(cfg) = checked.config.clone() else {
        for line in checked.lines() {
            eprintln!("{line}");
        }
        eprintln!(
            "{} error(s) in the configuration: not starting (siterelay check-config lists the same)",
            checked.errors.len()
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status("configuration error")]);
        return ExitCode::FAILURE;
    };
    init_logging(&cfg.log);
    for line in checked.lines() {
        warn!("{line}");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(daemon(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP: every MLLP feed reads its certificate, key, client CA and CRL again; a feed whose new
/// files cannot be used keeps the ones in use (and says so). Open connections are untouched.
fn reload_mllp_certificates_on_sighup(d: &siterelay::app::Daemon) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let certs = d.mllp_certificates();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let refused = certs.reload();
            info!(refused, "SIGHUP: MLLP certificates reloaded");
        }
    });
    Ok(())
}

async fn daemon(cfg: config::Config) -> anyhow::Result<()> {
    use sd_notify::NotifyState;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut d = siterelay::app::Daemon::start(&cfg).await?;
    reload_mllp_certificates_on_sighup(&d)?;
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status("running")]);
    // WATCHDOG=1 only while the outbox writer answers: a wedged writer stops the pings and
    // systemd restarts the daemon. A part that dies outright is caught below, at once.
    let watchdog = sd_notify::watchdog_enabled().map(|usec| {
        // Ping at half the interval systemd expects.
        let every = (usec / 2).max(Duration::from_millis(100));
        let outbox = d.outbox().clone();
        tokio::spawn(async move {
            loop {
                if let Ok(true) = tokio::time::timeout(every, outbox.probe()).await {
                    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                }
                tokio::time::sleep(every).await;
            }
        })
    });
    let mut failure = None;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
        why = d.failed() => {
            error!(reason = %why, "a vital part of siterelay stopped: shutting down to be restarted");
            failure = Some(why);
        }
    }
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    // The watchdog holds an outbox handle: it must go before the writer is told to finish.
    if let Some(w) = watchdog {
        w.abort();
        let _ = w.await;
    }
    d.stop().await;
    match failure {
        // Exit non-zero so systemd (Restart=on-failure) starts a fresh daemon.
        Some(why) => anyhow::bail!("stopped because {why}"),
        None => Ok(()),
    }
}

fn send(
    to: &str,
    timeout: Duration,
    files: &[PathBuf],
    tls: &siterelay::client::SendTlsArgs,
) -> ExitCode {
    let rt = small_runtime();
    rt.block_on(async {
        let mut messages = Vec::new();
        for f in files {
            match std::fs::read(f) {
                Ok(bytes) => {
                    let found = split_messages(&bytes);
                    if found.is_empty() {
                        eprintln!("{}: no HL7 message found", f.display());
                        return ExitCode::FAILURE;
                    }
                    messages.extend(found.into_iter().map(|m| (f.clone(), m)));
                }
                Err(e) => {
                    eprintln!("{}: {e}", f.display());
                    return ExitCode::FAILURE;
                }
            }
        }
        let stream = match tokio::net::TcpStream::connect(to).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot connect to {to}: {e}");
                return ExitCode::FAILURE;
            }
        };
        if !tls.wanted() {
            return send_messages(MllpClient::new(stream), &messages, timeout, to).await;
        }
        let (connector, name) = match tls.connector(to) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let shown = name.to_str().into_owned();
        match connector.connect(name, stream).await {
            Ok(s) => send_messages(MllpClient::new(s), &messages, timeout, &shown).await,
            Err(e) => {
                eprintln!(
                    "TLS with {to} failed: {}",
                    siterelay::client::describe_tls_error(&e, &shown)
                );
                ExitCode::FAILURE
            }
        }
    })
}

/// Send each message in turn and print its ACK (see `Command::Send` for the exit code).
/// `server_name` is for TLS errors (a refused client certificate shows on the first read).
async fn send_messages<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut client: MllpClient<S>,
    messages: &[(PathBuf, Vec<u8>)],
    timeout: Duration,
    server_name: &str,
) -> ExitCode {
    {
        let describe = |e: &siterelay::client::ClientError| match e {
            siterelay::client::ClientError::Io(io) => {
                siterelay::client::describe_tls_error(io, server_name)
            }
            other => other.to_string(),
        };
        let mut failures = 0;
        for (i, (file, m)) in messages.iter().enumerate() {
            if siterelay::hl7::batch::is_batch(m) {
                let held = m
                    .split(|&b| b == b'\r')
                    .filter(|l| l.starts_with(b"MSH"))
                    .count();
                match client.send_batch(m, timeout).await {
                    Ok(naks) => {
                        println!(
                            "{} #{}: batch of {held} message(s): {}",
                            file.display(),
                            i + 1,
                            if naks.is_empty() {
                                "all accepted".to_string()
                            } else {
                                format!("{} not accepted", naks.len())
                            }
                        );
                        for ack in &naks {
                            println!("  {} {} ({})", ack.code, ack.control_id, ack.text);
                        }
                        failures += naks.len();
                    }
                    Err(e) => {
                        println!(
                            "{} #{}: no batch ACK: {}",
                            file.display(),
                            i + 1,
                            describe(&e)
                        );
                        return ExitCode::FAILURE;
                    }
                }
                continue;
            }
            match client.send(m, timeout).await {
                Ok(ack) => {
                    if ack.code != "AA" && ack.code != "CA" {
                        failures += 1;
                    }
                    println!(
                        "{} #{}: {} {}{}",
                        file.display(),
                        i + 1,
                        ack.code,
                        ack.control_id,
                        if ack.text.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", ack.text)
                        }
                    );
                }
                Err(e) => {
                    println!("{} #{}: no ACK: {}", file.display(), i + 1, describe(&e));
                    return ExitCode::FAILURE;
                }
            }
        }
        if failures > 0 {
            eprintln!("{failures} of {} message(s) not accepted", messages.len());
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}

fn rejected(path: &Path, json: bool, cmd: RejectedCommand) -> ExitCode {
    let Some(cfg) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    if let RejectedCommand::Retry { id, all } = cmd {
        let line = match (id, all) {
            (Some(id), false) => format!("retry {id}"),
            (None, true) => "retry all".to_string(),
            _ => {
                eprintln!("give a quarantine id or --all");
                return ExitCode::FAILURE;
            }
        };
        let sock = siterelay::status::socket_path(&cfg.data_dir);
        let rt = small_runtime();
        return match rt.block_on(siterelay::status::request(&sock, &line)) {
            Ok(v) => {
                let results = v["results"].as_array().cloned().unwrap_or_default();
                let stored = results.iter().filter(|r| r["stored"] == true).count();
                if json {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                } else if v["ok"] != true {
                    println!(
                        "Nothing retried: {} (see `siterelay queue rejected`).",
                        v["error"]
                            .as_str()
                            .unwrap_or("the daemon refused the request")
                    );
                } else {
                    for r in &results {
                        match (r["stored"] == true, r["seq"].as_u64()) {
                            (true, Some(seq)) => println!(
                                "Message {} passed this time: stored as seq {seq} of its feed and will be forwarded.",
                                r["id"]
                            ),
                            (true, None) => {
                                println!("Message {} passed this time and was stored.", r["id"])
                            }
                            (false, _) => println!(
                                "Message {} still fails and stays in quarantine: {}",
                                r["id"],
                                r["error"].as_str().unwrap_or("refused")
                            ),
                        }
                    }
                    println!(
                        "{stored} of {} quarantined message(s) stored{}.",
                        results.len(),
                        if stored == 0 { "; nothing changed" } else { "" }
                    );
                }
                // Success means something was stored: nothing matched, or nothing passed, is
                // a failure a script can see.
                if v["ok"] == true && stored > 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!(
                    "the daemon must be running to retry (messages are stored through it): {} did not answer: {e}",
                    sock.display()
                );
                ExitCode::FAILURE
            }
        };
    }
    let which = match &cmd {
        RejectedCommand::Show { id, .. } | RejectedCommand::Export { id, .. } => Some(*id),
        _ => None,
    };
    let rows = match siterelay::outbox::Reader::open(&cfg.outbox_path())
        .and_then(|r| r.quarantined(which))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match cmd {
        RejectedCommand::List => {
            if json {
                println!("{}", serde_json::to_string(&rows).unwrap_or_default());
            } else {
                println!(
                    "{:>6}  {:<27} {:<16} {:>5} {:<8} {:>8}  REASON",
                    "ID", "RECEIVED", "FEED", "CODE", "WHERE", "BYTES"
                );
                for r in &rows {
                    println!(
                        "{:>6}  {:<27} {:<16} {:>5} {:<8} {:>8}  {}",
                        r.id,
                        siterelay::record::rfc3339_us(r.received_at_us),
                        r.feed,
                        r.error_code,
                        r.error_location.as_deref().unwrap_or("-"),
                        r.size,
                        siterelay::text::for_terminal(&r.reason)
                    );
                }
                if rows.is_empty() {
                    println!("(no quarantined messages)");
                }
            }
            ExitCode::SUCCESS
        }
        RejectedCommand::Show { id, raw } => match rows.first() {
            Some(r) => show_stored(r, &r.raw, json, raw),
            None => {
                eprintln!("no quarantined message {id}");
                ExitCode::FAILURE
            }
        },
        RejectedCommand::Export { id, out } => match rows.first() {
            Some(r) => export_bytes(&r.raw, &out),
            None => {
                eprintln!("no quarantined message {id}");
                ExitCode::FAILURE
            }
        },
        RejectedCommand::Retry { .. } => unreachable!("handled above"),
    }
}

fn held(path: &Path, json: bool, cmd: HeldCommand) -> ExitCode {
    let Some(cfg) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    let db = cfg.outbox_path();
    if let HeldCommand::Retry { id, all, wait_secs } = cmd {
        let line = match (id, all) {
            (Some(id), false) => format!("held retry {id}"),
            (None, true) => "held retry all".to_string(),
            _ => {
                eprintln!("give a row id or --all");
                return ExitCode::FAILURE;
            }
        };
        let sock = siterelay::status::socket_path(&cfg.data_dir);
        let rt = small_runtime();
        let mut v = match rt.block_on(siterelay::status::request(&sock, &line)) {
            Ok(v) => v,
            Err(e) => {
                eprintln!(
                    "the daemon must be running to retry (it publishes the records): {} did not answer: {e}",
                    sock.display()
                );
                return ExitCode::FAILURE;
            }
        };
        if v["ok"] != true {
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!(
                    "Nothing released: {} (see `siterelay queue held`).",
                    v["error"]
                        .as_str()
                        .unwrap_or("the daemon refused the request")
                );
            }
            return ExitCode::FAILURE;
        }
        // Watch what becomes of each released record: delivered, or held again.
        let rows: Vec<i64> = v["released"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["row"].as_i64()).collect())
            .unwrap_or_default();
        let deadline = std::time::Instant::now() + Duration::from_secs(wait_secs);
        let states = loop {
            let states: Vec<&str> = match siterelay::outbox::Reader::open(&db) {
                Ok(r) => rows
                    .iter()
                    .map(|&id| r.row_state(id).ok().flatten().unwrap_or("gone"))
                    .collect(),
                Err(_) => rows.iter().map(|_| "unknown").collect(),
            };
            if states.iter().all(|s| *s != "pending") || std::time::Instant::now() >= deadline {
                break states;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if let Some(released) = v["released"].as_array_mut() {
            for (r, state) in released.iter_mut().zip(&states) {
                r["state"] = (*state).into();
            }
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            for r in v["released"].as_array().into_iter().flatten() {
                println!(
                    "Row {} ({} seq {}): {}.",
                    r["row"],
                    r["feed"].as_str().unwrap_or("?"),
                    r["seq"],
                    match r["state"].as_str().unwrap_or("unknown") {
                        "delivered" => "delivered",
                        "held" => "held again (see `siterelay queue held show`)",
                        "pending" => "released, not confirmed by the broker yet",
                        other => other,
                    }
                );
            }
        }
        return if states.iter().all(|s| *s == "delivered") {
            ExitCode::SUCCESS
        } else {
            eprintln!(
                "not every released record was delivered (held again: see `siterelay queue held`; pending: the broker has not confirmed it yet)"
            );
            ExitCode::FAILURE
        };
    }
    let which = match &cmd {
        HeldCommand::Show { id, .. } | HeldCommand::Export { id, .. } => Some(*id),
        _ => None,
    };
    let with_raw = matches!(cmd, HeldCommand::Show { .. } | HeldCommand::Export { .. });
    let rows = match siterelay::outbox::Reader::open(&db).and_then(|r| r.held(which, with_raw)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "{e}\n(run as the daemon's user, e.g. sudo -u siterelay siterelay queue held)"
            );
            return ExitCode::FAILURE;
        }
    };
    let time = siterelay::record::rfc3339_us;
    match cmd {
        HeldCommand::List => {
            if json {
                println!("{}", serde_json::to_string(&rows).unwrap_or_default());
            } else {
                println!(
                    "{:>8}  {:<16} {:>8}  {:<27} {:>9}  {:<11} DETAIL",
                    "ROW", "FEED", "SEQ", "HELD SINCE", "BYTES", "REASON"
                );
                for r in &rows {
                    println!(
                        "{:>8}  {:<16} {:>8}  {:<27} {:>9}  {:<11} {}",
                        r.row_id,
                        r.feed,
                        r.seq,
                        time(r.since_us),
                        r.size,
                        r.reason,
                        siterelay::text::for_terminal(&r.detail)
                    );
                }
                if rows.is_empty() {
                    println!("(no held records)");
                }
            }
            ExitCode::SUCCESS
        }
        HeldCommand::Show { id, raw } => match rows.first() {
            Some(r) => show_stored(r, &r.raw, json, raw),
            None => {
                eprintln!("no held record {id}");
                ExitCode::FAILURE
            }
        },
        HeldCommand::Export { id, out } => match rows.first() {
            Some(r) => export_bytes(&r.raw, &out),
            None => {
                eprintln!("no held record {id}");
                ExitCode::FAILURE
            }
        },
        HeldCommand::Retry { .. } => unreachable!("handled above"),
    }
}

/// `queue rejected show` / `queue held show`: the stored message's metadata and (patient data,
/// for the person at the box) its text, segments on separate lines; with `--json`, one document.
/// The bytes are a sender's: control characters and escape sequences are shown escaped (`\x1b`)
/// so they cannot move the cursor, retitle the window or hide text, unless `--raw`.
fn show_stored<T: serde::Serialize>(row: &T, raw: &[u8], json: bool, as_is: bool) -> ExitCode {
    use siterelay::text::{for_terminal, json_for_terminal};
    let safe_json = |s: String| {
        if as_is {
            s
        } else {
            json_for_terminal(&s).into_owned()
        }
    };
    if json {
        let mut v = serde_json::to_value(row).unwrap_or_default();
        v["raw"] = String::from_utf8_lossy(raw).into_owned().into();
        println!(
            "{}",
            safe_json(serde_json::to_string_pretty(&v).unwrap_or_default())
        );
    } else {
        println!(
            "{}",
            safe_json(serde_json::to_string_pretty(row).unwrap_or_default())
        );
        println!("--- message (patient data; segments on separate lines) ---");
        let text = String::from_utf8_lossy(raw).replace('\r', "\n");
        if as_is {
            println!("{text}");
        } else {
            println!("{}", for_terminal(&text));
        }
    }
    ExitCode::SUCCESS
}

/// `queue rejected export` / `queue held export`: the bytes exactly as received, to a new file
/// readable by its owner only (never over an existing file).
fn export_bytes(raw: &[u8], out: &Path) -> ExitCode {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .and_then(|mut f| f.write_all(raw));
    match written {
        Ok(()) => {
            println!("wrote {} bytes to {}", raw.len(), out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

/// `queue salvage`: export what a damaged store still holds. Needs no configuration.
fn salvage(file: &Path, out: Option<PathBuf>, json: bool) -> ExitCode {
    use siterelay::outbox::{damage, salvage};
    let out = out.unwrap_or_else(|| file.parent().unwrap_or(Path::new(".")).join("salvaged"));
    let r = match salvage::salvage(file, &out) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("siterelay queue salvage: {e}");
            return ExitCode::from(2);
        }
    };
    let summary = serde_json::json!({
        "salvaged_at": r.salvaged_at, "out_dir": r.out_dir, "rows_read": r.rows_read,
        "pending_exported": r.pending_exported, "rows_unreadable": r.rows_unreadable,
        "regions_unreadable": r.regions_unreadable, "pending_lost": r.pending_lost,
        "complete": r.complete,
    });
    if let Err(e) = damage::record_salvaged(file, &summary) {
        eprintln!(
            "could not record the salvage next to {} ({e}): health still lists it as not salvaged",
            file.display()
        );
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).unwrap_or_default()
        );
    } else {
        println!(
            "{}: {} message row(s) read, {} undelivered exported to {} (index.json), {} delivered left out",
            file.display(),
            r.rows_read,
            r.pending_exported,
            out.display(),
            r.delivered_skipped
        );
        println!(
            "unreadable: {} row(s), {} damaged stretch(es) of rows, {} undelivered message(s) named but not readable{}{}",
            r.rows_unreadable,
            r.regions_unreadable,
            r.pending_lost,
            if r.state_complete {
                ""
            } else {
                "; delivery state incomplete: messages of unknown state exported too"
            },
            if r.header_repaired {
                "; header repaired (in the copy)"
            } else {
                ""
            }
        );
        if r.pending_exported > 0 {
            println!(
                "next: re-send the .hl7 files to their feed (siterelay send --to HOST:PORT FILE...), see docs/operations.md, \"A damaged store\""
            );
        }
    }
    ExitCode::from(if r.complete { 0 } else { 1 })
}

/// `status` exit code: the daemon answered and is healthy.
const STATUS_HEALTHY: u8 = 0;
/// `status` exit code: the daemon answered and is degraded.
const STATUS_DEGRADED: u8 = 1;
/// `status` exit code: the daemon did not answer (or its configuration could not be read).
const STATUS_DOWN: u8 = 3;

fn status(path: &Path, json: bool) -> ExitCode {
    let Some(cfg) = load_or_report(path) else {
        return ExitCode::from(STATUS_DOWN);
    };
    let sock = siterelay::status::socket_path(&cfg.data_dir);
    let rt = small_runtime();
    match rt.block_on(siterelay::status::query(&sock)) {
        Ok(h) => {
            let degraded = siterelay::status::degraded(&h);
            if json {
                println!("{}", serde_json::to_string_pretty(&h).unwrap_or_default());
            } else {
                print!("{}", siterelay::status::render(&h));
            }
            ExitCode::from(if degraded.is_empty() {
                STATUS_HEALTHY
            } else {
                STATUS_DEGRADED
            })
        }
        Err(e) => {
            let line = format!(
                "siterelay {}: daemon NOT answering on {} ({e}); what the outbox file says:",
                cfg.appliance_id,
                sock.display()
            );
            // With --json, stdout holds JSON only.
            if json {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
            let _ = queue_stats(path, json);
            ExitCode::from(STATUS_DOWN)
        }
    }
}

fn metrics(path: &Path, out: Option<&Path>) -> ExitCode {
    let Some(cfg) = load_or_report(path) else {
        return ExitCode::from(STATUS_DOWN);
    };
    let sock = siterelay::status::socket_path(&cfg.data_dir);
    let rt = small_runtime();
    let (text, code) = match rt.block_on(siterelay::status::query(&sock)) {
        Ok(h) => {
            // Each feed's queue depth, from the outbox file (read-only, as `queue stats`).
            let stats = siterelay::outbox::Reader::open(&cfg.outbox_path())
                .and_then(|r| r.stats())
                .unwrap_or_default();
            (siterelay::metrics::render(&h, &stats), STATUS_HEALTHY)
        }
        Err(e) => {
            eprintln!(
                "siterelay {}: daemon NOT answering on {} ({e})",
                cfg.appliance_id,
                sock.display()
            );
            (siterelay::metrics::render_down(), STATUS_DOWN)
        }
    };
    match out {
        None => print!("{text}"),
        Some(file) => {
            let tmp = file.with_extension(format!("prom.{}.tmp", std::process::id()));
            let written = std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, file));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                eprintln!("{}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::from(code)
}

fn queue_stats(path: &Path, json: bool) -> ExitCode {
    let Some(cfg) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    let db = cfg.outbox_path();
    if !db.exists() {
        eprintln!(
            "{}: no outbox yet (the daemon has not run with this data_dir)",
            db.display()
        );
        return ExitCode::FAILURE;
    }
    let stats = match siterelay::outbox::Reader::open(&db).and_then(|r| r.stats()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "{e}\n(run as the daemon's user, e.g. sudo -u siterelay siterelay queue stats)"
            );
            return ExitCode::FAILURE;
        }
    };
    if json {
        let rows: Vec<_> = stats
            .iter()
            .map(|s| {
                serde_json::json!({
                    "feed": s.feed,
                    "pending": s.pending,
                    "pending_bytes": s.pending_bytes,
                    "delivered": s.delivered,
                    "delivered_bytes": s.delivered_bytes,
                    "oldest_pending_age_secs": s.oldest_pending_age.map(|d| d.as_secs_f64()),
                    "last_seq": s.last_seq,
                    "held": s.held,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<24} {:>10} {:>6} {:>14} {:>12} {:>10} {:>14} {:>10}",
        "FEED",
        "PENDING",
        "HELD",
        "PENDING BYTES",
        "OLDEST",
        "DELIVERED",
        "DELIV. BYTES",
        "LAST SEQ"
    );
    for s in &stats {
        println!(
            "{:<24} {:>10} {:>6} {:>14} {:>12} {:>10} {:>14} {:>10}",
            s.feed,
            s.pending,
            s.held,
            s.pending_bytes,
            s.oldest_pending_age
                .map(siterelay::units::human_duration)
                .unwrap_or_else(|| "-".into()),
            s.delivered,
            s.delivered_bytes,
            s.last_seq
        );
    }
    if stats.is_empty() {
        println!("(outbox is empty)");
    }
    ExitCode::SUCCESS
}
