//! `hearth session …`, `hearth exec …`, `hearth pool status`, `hearth templates`: thin commands on
//! [`HearthClient`] for people. Results print as JSON (pipe them to `jq`); errors print on one line.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use hearth_messages::{
    CreateSessionRequest, ExecEvent, ExecRequest, HearthClient, ListSessionsRequest, SessionId,
    TemplateName,
};

/// `hearth session …`.
#[derive(Debug, clap::Subcommand)]
pub enum SessionCmd {
    /// Claim a session (warm from the pool when one is ready).
    Create {
        /// Template to claim from.
        #[arg(long, short)]
        template: Option<String>,
        /// Session id (an idempotency key); generated when absent.
        #[arg(long)]
        id: Option<String>,
        /// Lifetime in seconds.
        #[arg(long)]
        ttl: Option<u64>,
        /// Idle timeout in seconds.
        #[arg(long)]
        idle_timeout: Option<u64>,
        /// Labels, `key=value`, repeatable.
        #[arg(long = "label", short = 'l', value_parser = parse_pair)]
        labels: Vec<(String, String)>,
        /// How long to wait for a cold restore when the pool is empty (ms).
        #[arg(long)]
        wait_ms: Option<u64>,
    },
    /// Show one session.
    Get {
        /// Session id.
        session: String,
    },
    /// List sessions.
    List {
        /// Only this template.
        #[arg(long, short)]
        template: Option<String>,
        /// Only sessions with these labels, `key=value`.
        #[arg(long = "label", short = 'l', value_parser = parse_pair)]
        labels: Vec<(String, String)>,
    },
    /// Extend a session's lifetime.
    Keepalive {
        /// Session id.
        session: String,
        /// New lifetime from now, seconds.
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// End a session now.
    Release {
        /// Session id.
        session: String,
    },
    /// Pause a session to disk (the next exec, file transfer or keepalive resumes it).
    Pause {
        /// Session id.
        session: String,
        /// Also upload the paused state to the object store, so the session survives the loss of
        /// its worker (`--upload true`), or not (`--upload false`); default: the template's
        /// `pause_upload`.
        #[arg(long)]
        upload: Option<bool>,
    },
    /// Branch a live session into new sessions with their own identities.
    Fork {
        /// Session id.
        session: String,
        /// How many copies.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Lifetime of the copies, seconds (default: the source's).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Capture a session as a new template.
    Snapshot {
        /// Session id.
        session: String,
        /// The new template's name.
        template: String,
        /// Warm pool size for the new template.
        #[arg(long)]
        min_ready: Option<u32>,
    },
}

/// `hearth exec` arguments.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Session id.
    pub session: String,
    /// Kill the command after this many milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Working directory inside the VM's volume.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment, `KEY=value`, repeatable.
    #[arg(long = "env", short = 'e', value_parser = parse_pair)]
    pub env: Vec<(String, String)>,
    /// Run through the VM's shell (`sh -c "<args joined>"`) instead of directly.
    #[arg(long)]
    pub shell: bool,
    /// The command and its arguments (after `--`).
    #[arg(trailing_var_arg = true, required = true)]
    pub argv: Vec<String>,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

fn sid(s: &str) -> Result<SessionId> {
    SessionId::new(s).context("invalid session id")
}

fn template(s: &str) -> Result<TemplateName> {
    TemplateName::new(s).context("invalid template name")
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Runs a `hearth session` command.
pub async fn session(client: &HearthClient, cmd: SessionCmd) -> Result<()> {
    match cmd {
        SessionCmd::Create {
            template: t,
            id,
            ttl,
            idle_timeout,
            labels,
            wait_ms,
        } => {
            let request = CreateSessionRequest {
                template: t.as_deref().map(template).transpose()?,
                session_id: id.as_deref().map(sid).transpose()?,
                ttl_s: ttl,
                idle_timeout_s: idle_timeout,
                labels: labels.into_iter().collect(),
                wait_ms,
            };
            print_json(&client.create_session(&request).await?)
        }
        SessionCmd::Get { session } => print_json(&client.get_session(&sid(&session)?).await?),
        SessionCmd::List {
            template: t,
            labels,
        } => {
            let request = ListSessionsRequest {
                template: t.as_deref().map(template).transpose()?,
                labels: labels.into_iter().collect(),
            };
            print_json(&client.list_sessions(&request).await?)
        }
        SessionCmd::Keepalive { session, ttl } => {
            print_json(&client.keepalive(&sid(&session)?, ttl).await?)
        }
        SessionCmd::Release { session } => print_json(&client.release(&sid(&session)?).await?),
        SessionCmd::Pause { session, upload } => print_json(
            &client
                .pause_with(&sid(&session)?, &hearth_messages::PauseRequest { upload })
                .await?,
        ),
        SessionCmd::Fork {
            session,
            count,
            ttl,
        } => {
            let request = hearth_messages::ForkSessionRequest {
                count,
                ttl_s: ttl,
                ..Default::default()
            };
            print_json(&client.fork(&sid(&session)?, &request).await?)
        }
        SessionCmd::Snapshot {
            session,
            template: t,
            min_ready,
        } => print_json(
            &client
                .snapshot_session(&sid(&session)?, template(&t)?, min_ready)
                .await?,
        ),
    }
}

/// `hearth pool status`.
pub async fn pool_status(client: &HearthClient) -> Result<()> {
    print_json(&client.pool_status().await?)
}

/// `hearth admin maintenance`: the scheduler's lifecycle pass, now.
pub async fn maintenance(client: &HearthClient) -> Result<()> {
    print_json(&client.run_maintenance().await?)
}

/// `hearth admin workers`.
pub async fn workers(client: &HearthClient) -> Result<()> {
    print_json(&client.workers_status().await?)
}

/// `hearth templates`.
pub async fn templates(client: &HearthClient, args: TemplatesArgs) -> Result<()> {
    match args.cmd {
        None | Some(TemplatesCmd::List) => print_json(&client.list_templates().await?),
        Some(TemplatesCmd::Build(args)) => build_template(&args),
    }
}

/// `hearth templates [list | build]`.
#[derive(Debug, clap::Args)]
pub struct TemplatesArgs {
    #[command(subcommand)]
    pub cmd: Option<TemplatesCmd>,
}

/// `hearth templates …`.
#[derive(Debug, clap::Subcommand)]
pub enum TemplatesCmd {
    /// List templates (the default).
    List,
    /// Check and unpack a container image (an OCI layout directory or archive, or a `docker
    /// save` / `podman save` tarball) into a worker's root filesystem cache, and print the
    /// `[[templates]]` entry that makes it a template (the scheduler builds it as any other:
    /// bootstrap, snapshot, warm pool).
    Build(BuildTemplateArgs),
}

/// `hearth templates build` flags.
#[derive(Debug, clap::Args)]
pub struct BuildTemplateArgs {
    /// The image.
    #[arg(long)]
    pub image: std::path::PathBuf,
    /// The template's name.
    #[arg(long)]
    pub name: String,
    /// The worker's image cache to unpack into: `<data_dir>/oci/images` for the oci provider,
    /// `<data_dir>/process/images` for the process provider (workers also unpack on first use).
    #[arg(long, default_value = "/var/lib/hearth/worker/oci/images")]
    pub cache: std::path::PathBuf,
    /// Argv run once in the template's build VM, repeatable (`--bootstrap sh --bootstrap -c …`).
    #[arg(long, allow_hyphen_values = true)]
    pub bootstrap: Vec<String>,
}

/// `hearth templates build`: unpacks the image (checked: digests, no path escaping the cache, no
/// device nodes) and prints the template entry for the scheduler's configuration.
pub fn build_template(args: &BuildTemplateArgs) -> Result<()> {
    TemplateName::new(args.name.clone()).context("invalid template name")?;
    let image = std::path::absolute(&args.image)
        .with_context(|| format!("cannot resolve {}", args.image.display()))?;
    if !hearth_worker::image::is_image(&image) {
        bail!(
            "{} is not a container image (an OCI layout or archive, or a docker save tarball)",
            image.display()
        );
    }
    let cache = hearth_worker::image::ImageCache::open(&args.cache)?;
    let rootfs = cache.unpack(&image)?;
    eprintln!(
        "image {} unpacked at {}",
        rootfs.info.id,
        rootfs.path.display()
    );
    let mut entry = format!(
        "[[templates]]\nname = {}\nbase = {}\n",
        toml_string(&args.name),
        toml_string(&image.to_string_lossy())
    );
    if !args.bootstrap.is_empty() {
        let argv: Vec<String> = args.bootstrap.iter().map(|a| toml_string(a)).collect();
        entry.push_str(&format!("bootstrap = [{}]\n", argv.join(", ")));
    }
    print!("{entry}");
    Ok(())
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// `hearth exec`: streams the command's output to ours and returns its exit code.
pub async fn exec(client: &HearthClient, args: ExecArgs) -> Result<i32> {
    let session = sid(&args.session)?;
    let base = if args.shell {
        ExecRequest::cmd(args.argv.join(" "))
    } else {
        ExecRequest::argv(args.argv)
    };
    let request = ExecRequest {
        env: args.env.into_iter().collect::<BTreeMap<_, _>>(),
        cwd: args.cwd,
        timeout_ms: args.timeout_ms,
        ..base
    };
    let mut stream = Box::pin(client.exec_stream(&session, &request).await?);
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    while let Some(event) = stream.next().await {
        match event? {
            ExecEvent::Stdout(bytes) => {
                stdout.write_all(&bytes)?;
                stdout.flush()?;
            }
            ExecEvent::Stderr(bytes) => {
                stderr.write_all(&bytes)?;
                stderr.flush()?;
            }
            ExecEvent::Done(result) => {
                stdout.write_all(result.stdout.as_bytes())?;
                stderr.write_all(result.stderr.as_bytes())?;
                if result.stdout_truncated || result.stderr_truncated {
                    eprintln!("hearth: output was truncated at the session's cap");
                }
                if result.timed_out {
                    eprintln!("hearth: command timed out and was killed");
                }
                return Ok(result.exit_code);
            }
        }
    }
    bail!("the exec stream ended without a result")
}
