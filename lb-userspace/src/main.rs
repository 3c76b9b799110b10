//! lb-agent: the userspace half of the load balancer.

mod cli;

use anyhow::Result;
use clap::Parser;
use lb_userspace::{
    datapath::{inspect, loader, map_memory},
    seccomp_profile,
};

use cli::{
    args::{CheckArgs, Cli, Command, Output},
    commands::{check, print_stats},
    run::{run, set_malloc_arenas},
};

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            set_malloc_arenas(&args);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(run(&cli.pin_dir, *args))
        }
        Command::Services { output } => {
            let maps = loader::open_pinned(&cli.pin_dir)?;
            let services = inspect::programmed_services(&maps.read_contents()?);
            show(output, &services, |s| inspect::render_table(s))
        }
        Command::Stats { output, family } => {
            print_stats(&cli.pin_dir, output, family.map(Into::into))
        }
        Command::Maps { output } => {
            let usage = map_memory::pinned_usage(&cli.pin_dir)?;
            show(output, &usage, |u| map_memory::render_table(u))
        }
        Command::Status { output } => {
            let status = inspect::attach_status(&cli.pin_dir);
            show(output, &status, inspect::render_status)
        }
        Command::Check(args) => check_and_exit(&cli.pin_dir, &args),
        Command::Cleanup => {
            for p in loader::cleanup(&cli.pin_dir)? {
                println!("removed {}", p.display());
            }
            Ok(())
        }
        Command::SeccompProfile { output: None } => {
            print!("{}", seccomp_profile::PROFILE);
            Ok(())
        }
        Command::SeccompProfile { output: Some(path) } => {
            seccomp_profile::write(&path)?;
            println!("wrote {}", path.display());
            Ok(())
        }
    }
}

/// Prints `value` as a table (`render`) or as JSON.
fn show<T: serde::Serialize + ?Sized>(
    output: Output,
    value: &T,
    render: impl FnOnce(&T) -> String,
) -> Result<()> {
    match output {
        Output::Table => print!("{}", render(value)),
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

/// `lb-agent check`: exits 0 when the maps equal the desired state, 1 when
/// they differ (listing every difference), 2 when it could not tell.
fn check_and_exit(pin_dir: &std::path::Path, args: &CheckArgs) -> Result<()> {
    let report = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(check(pin_dir, args)));
    match report {
        Ok(report) if report.is_equal() => {
            println!("{report}");
            Ok(())
        }
        Ok(report) => {
            print!("{report}");
            std::process::exit(1)
        }
        // Told apart from "the maps differ".
        Err(e) => {
            eprintln!("lb-agent check: {e:#}");
            std::process::exit(2)
        }
    }
}
