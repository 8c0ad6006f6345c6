//! The dispatcher: validates requests and publishes jobs (HTTP API and CLI).
//!
//! Exit codes: 0 success; 1 failure (or, with `submit --wait` and `watch`, a
//! job that did not succeed); 2 an invalid request (the message names the field).

mod admission;
mod auth;
mod cli;
mod commands;
mod http;
mod inputs;
mod jobs;
mod loras;
mod metrics;
mod publishing;
mod webhooks;

use std::process::ExitCode;

use clap::Parser;
use common::event::EventKind;
use common::status::JobState;

use crate::cli::{Cli, Command};
use crate::jobs::JobsError;

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ok = |good: bool| {
        if good {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    };
    Ok(match cli.command {
        Command::Serve(args) => {
            commands::serve(args, shutdown_signal()).await?;
            ExitCode::SUCCESS
        }
        Command::Submit(args) => match commands::submit(*args).await? {
            None => ExitCode::SUCCESS,
            Some(state) => ok(state == JobState::Succeeded),
        },
        Command::Status(args) => {
            commands::status(args).await?;
            ExitCode::SUCCESS
        }
        Command::Watch(args) => ok(commands::watch(args).await? == EventKind::Succeeded),
        Command::Cancel(args) => {
            commands::cancel(args).await?;
            ExitCode::SUCCESS
        }
        Command::Loras(command) => {
            commands::loras(command).await?;
            ExitCode::SUCCESS
        }
        Command::HashKey => {
            commands::hash_key()?;
            ExitCode::SUCCESS
        }
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(code) => code,
        Err(err) => {
            let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            match err.downcast_ref::<JobsError>() {
                Some(JobsError::Invalid(_)) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
