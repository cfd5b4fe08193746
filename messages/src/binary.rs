//! What every Hearth binary's `main` does, once: build the runtime of the flavour it asks for,
//! start telemetry inside it (an OTLP exporter's gRPC channel lives on the runtime), run the
//! binary's `serve`, shut telemetry down, and map the outcome to an exit code in one place.
//!
//! Exit codes: 0 on a clean stop (SIGTERM/SIGINT drain included), 64 (`EX_USAGE`) when the
//! configuration — or a host that cannot give what the configuration asks — is at fault, 1 for
//! anything else. The error goes to stderr on one line, its causes joined with `: `.

use std::error::Error;
use std::future::Future;
use std::process::ExitCode;

use crate::telemetry;

/// Exit code of a configuration error (`EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// A binary's typed failure and the exit code it maps to.
pub trait Failure: Error {
    /// The process exit code for this failure (default 1).
    fn exit_code(&self) -> u8 {
        1
    }
}

/// Which tokio runtime a binary runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// One thread: lower latency for the scheduler's request/reply work (measured, NOTES.md).
    CurrentThread,
    /// A worker's blocking-heavy VM work spreads over the cores: this many threads, or one per
    /// core.
    MultiThread(Option<usize>),
}

/// `error` and every `source()` below it, joined with `: ` on one line.
pub fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Wrappers often repeat their cause in their own message (`{context}: {source}`).
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

/// Reports a configuration error for `name` and returns exit code 64.
pub fn config_error(name: &str, error: &dyn Error) -> ExitCode {
    eprintln!("{name}: {}", error_chain(error));
    ExitCode::from(EXIT_CONFIG)
}

/// Runs `serve` on a `runtime` with telemetry named `name`; returns the exit code its outcome
/// maps to.
pub fn run<E, F>(name: &'static str, runtime: Runtime, serve: F) -> ExitCode
where
    E: Failure,
    F: Future<Output = Result<(), E>>,
{
    let built = match runtime {
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Runtime::MultiThread(threads) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = threads {
                builder.worker_threads(n);
            }
            builder.enable_all().build()
        }
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("{name}: cannot start the runtime: {}", error_chain(&err));
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let telemetry = telemetry::init(name);
        let result = serve.await;
        telemetry.shutdown().await;
        result
    });
    exit_code(name, result)
}

/// Maps a binary's outcome to its exit code, printing a failure.
pub fn exit_code<E: Failure>(name: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{name}: {}", error_chain(&err));
            ExitCode::from(err.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("opening the provider")]
        Provider(#[source] std::io::Error),
        #[error("config")]
        Config,
    }

    impl Failure for Outer {
        fn exit_code(&self) -> u8 {
            match self {
                Outer::Config => EXIT_CONFIG,
                Outer::Provider(_) => 1,
            }
        }
    }

    #[test]
    fn failures_print_their_causes_on_one_line_and_choose_the_exit_code() {
        let err = Outer::Provider(std::io::Error::other("no bwrap\nat all"));
        assert_eq!(error_chain(&err), "opening the provider: no bwrap at all");
        assert_eq!(exit_code("t", Err(Outer::Config)), ExitCode::from(64));
        assert_eq!(exit_code::<Outer>("t", Ok(())), ExitCode::SUCCESS);
        assert_eq!(err.exit_code(), 1);
    }

    #[test]
    fn run_gives_serve_a_runtime_of_the_asked_flavour() {
        let code = run("t", Runtime::CurrentThread, async {
            let flavour = tokio::runtime::Handle::current().runtime_flavor();
            assert_eq!(flavour, tokio::runtime::RuntimeFlavor::CurrentThread);
            Ok::<(), Outer>(())
        });
        assert_eq!(code, ExitCode::SUCCESS);
        let code = run("t", Runtime::MultiThread(None), async {
            Err(Outer::Config)
        });
        assert_eq!(code, ExitCode::from(64));
    }
}
