//! lb-agent: the userspace half of the load balancer.

mod cli;

use anyhow::Result;
use clap::Parser;
use lb_userspace::{
    datapath::{inspect, loader, map_memory},
    seccomp_profile,
};

use cli::{
    args::{Cli, Command, Output},
    commands::{check, print_stats},
    run::{limit_malloc_arenas, run},
};

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            limit_malloc_arenas();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(run(&cli.pin_dir, *args))
        }
        Command::Services { output } => {
            let maps = loader::open_pinned(&cli.pin_dir)?;
            let services = inspect::programmed_services(&maps.read_contents()?);
            match output {
                Output::Table => print!("{}", inspect::render_table(&services)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&services)?),
            }
            Ok(())
        }
        Command::Stats { output } => print_stats(&cli.pin_dir, output),
        Command::Maps { output } => {
            let usage = map_memory::pinned_usage(&cli.pin_dir)?;
            match output {
                Output::Table => print!("{}", map_memory::render_table(&usage)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&usage)?),
            }
            Ok(())
        }
        Command::Status { output } => {
            let status = inspect::attach_status(&cli.pin_dir);
            match output {
                Output::Table => print!("{}", inspect::render_status(&status)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
            }
            Ok(())
        }
        Command::Check(args) => {
            let report = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(check(&cli.pin_dir, &args)));
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
