//! One benchmark run, from an empty machine to the written report.

use std::{
    path::PathBuf,
    sync::atomic::Ordering,
    time::{Duration, SystemTime},
};

use indicatif::{ProgressBar, ProgressStyle};

use crate::{
    BenchError, BenchOptions, Result,
    configs::{Availability, Bed, Configuration},
    cpu::{self, MachineCpu},
    io_error,
    machine::Machine,
    options::Workload,
    plan::{self, Step},
    plots, report,
    results::{BenchResults, ConfigurationStatus, SCHEMA_VERSION, Samples},
    workloads,
};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Where a run wrote its results.
pub struct RunOutput {
    pub json: PathBuf,
    pub report: PathBuf,
    pub results: BenchResults,
}

/// Runs every selected workload on every configuration that exists, interleaved.
pub fn run(options: &BenchOptions) -> Result<RunOutput> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(BenchError::NotRoot);
    }
    raise_open_file_limit();
    let started = SystemTime::now();
    let machine = Machine::describe();
    let statuses: Vec<(Configuration, Availability)> = Configuration::ALL
        .into_iter()
        .map(|c| {
            let selected = c.is_baseline()
                || options.configurations.is_empty()
                || options.configurations.contains(&c);
            let availability = if selected {
                c.availability(&machine)
            } else {
                Availability::Skipped("not selected (--configuration)".into())
            };
            (c, availability)
        })
        .collect();
    let measured: Vec<Configuration> = statuses
        .iter()
        .filter(|(_, a)| *a == Availability::Ready)
        .map(|(c, _)| *c)
        .collect();

    eprintln!("Machine: {}", machine.one_line());
    for (configuration, availability) in &statuses {
        let status = match availability {
            Availability::Ready => "measured".to_string(),
            Availability::NotBuiltYet(why) => format!("not built yet ({why})"),
            Availability::Skipped(why) => format!("skipped: {why}"),
        };
        eprintln!("  {:<26} {status}", configuration.id());
    }
    eprintln!("Building the test bed (2 nodes, one pod pair per configuration)…");
    let bed = Bed::build(&measured)?;
    for &configuration in &measured {
        let endpoints = bed.endpoints(configuration);
        workloads::latency(
            &endpoints.client,
            endpoints.echo,
            1,
            Duration::from_millis(50),
        )
        .map_err(|problem| BenchError::Configuration {
            configuration: configuration.id(),
            problem: format!("sanity check failed, nothing reaches the server: {problem}"),
        })?;
    }

    let steps = plan::interleaved(&options.workloads, &measured, options.repetitions);
    let progress = if options.progress {
        ProgressBar::new(steps.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}, ~{eta} left]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut samples = Samples::default();
    for step in &steps {
        if options.interrupted.load(Ordering::SeqCst) {
            progress.abandon_with_message("interrupted");
            return Err(BenchError::Report("interrupted: no report written".into()));
        }
        progress.set_message(format!(
            "{} · {} · repetition {}/{}",
            step.workload.id(),
            step.configuration.id(),
            step.repetition + 1,
            options.repetitions
        ));
        measure(&bed, options, step, &mut samples)?;
        progress.inc(1);
    }
    progress.finish_with_message("done");
    let datapath = bed.datapath_choices()?;
    drop(bed);

    let results = BenchResults {
        schema_version: SCHEMA_VERSION,
        started_at: humantime::format_rfc3339_seconds(started).to_string(),
        finished_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        profile: options.profile.into(),
        repetitions: options.repetitions,
        configurations: statuses
            .iter()
            .map(|(c, a)| ConfigurationStatus::new(*c, a))
            .collect(),
        metrics: samples.into_metrics(&measured),
        machine,
        datapath,
    };
    write(options, results)
}

fn measure(bed: &Bed, options: &BenchOptions, step: &Step, samples: &mut Samples) -> Result<()> {
    let configuration = step.configuration;
    let endpoints = bed.endpoints(configuration);
    let ns = &endpoints.client;
    let failed = |problem: String| BenchError::Measurement {
        workload: step.workload.id(),
        configuration: configuration.id(),
        problem,
    };
    let proxies = &endpoints.proxy_pids;
    let proxy_cpu = || sum_over(proxies, cpu::process_cpu_s);
    let proxy_rss = || sum_over(proxies, cpu::process_rss_kib);
    let proxy_threads = || sum_over(proxies, cpu::process_threads);
    match step.workload {
        Workload::Throughput1 | Workload::Throughput4 => {
            let streams = if step.workload == Workload::Throughput1 {
                1
            } else {
                4
            };
            let (machine_before, proxy_before) = (MachineCpu::now(), proxy_cpu());
            let result =
                workloads::throughput(ns, endpoints.iperf, streams, options.throughput_duration)
                    .map_err(failed)?;
            let (machine_after, proxy_after) = (MachineCpu::now(), proxy_cpu());
            let gbps = result.bits_per_second / 1e9;
            if streams == 4 {
                samples.record("throughput-4.gbps", configuration, gbps);
                return Ok(());
            }
            samples.record("throughput-1.gbps", configuration, gbps);
            let gib = result.bytes / GIB;
            if gib > 0.0 {
                if let (Some(after), Some(before)) = (machine_after, machine_before) {
                    let spent = after.since(&before);
                    samples.record(
                        "throughput-1.cpu-per-gib",
                        configuration,
                        spent.busy_s / gib,
                    );
                    samples.record(
                        "throughput-1.softirq-per-gib",
                        configuration,
                        spent.softirq_s / gib,
                    );
                }
                if configuration.has_proxy() {
                    samples.record(
                        "throughput-1.proxy-cpu-per-gib",
                        configuration,
                        (proxy_after - proxy_before) / gib,
                    );
                }
            }
        }
        Workload::Latency1B | Workload::Latency1K => {
            let (size, [p50, p99, p999]) = if step.workload == Workload::Latency1B {
                (1, ["latency-1b.p50", "latency-1b.p99", "latency-1b.p999"])
            } else {
                (
                    1024,
                    ["latency-1k.p50", "latency-1k.p99", "latency-1k.p999"],
                )
            };
            let sample = workloads::latency(ns, endpoints.echo, size, options.short_duration)
                .map_err(failed)?;
            samples.record(p50, configuration, sample.p50_us);
            samples.record(p99, configuration, sample.p99_us);
            samples.record(p999, configuration, sample.p999_us);
        }
        Workload::Connections => {
            let rate = workloads::connection_rate(ns, endpoints.one_shot, options.short_duration)
                .map_err(failed)?;
            samples.record("connections.rate", configuration, rate);
            let (started, proxy_before) = (std::time::Instant::now(), proxy_cpu());
            let rate = workloads::parallel_connection_rate(
                ns,
                endpoints.one_shot,
                options.short_duration,
                PARALLEL_CLIENTS,
            )
            .map_err(failed)?;
            let proxy_cores = (proxy_cpu() - proxy_before) / started.elapsed().as_secs_f64();
            samples.record("connections.parallel-rate", configuration, rate);
            if configuration.has_proxy() && proxy_cores > 0.0 {
                samples.record(
                    "connections.per-proxy-core",
                    configuration,
                    rate / proxy_cores,
                );
            }
        }
        Workload::ProxyMemory => {
            let threads_before = proxy_threads();
            let before = proxy_rss();
            let connections =
                workloads::open_connections(ns, endpoints.hold, options.held_connections)
                    .map_err(failed)?;
            // Let the proxies finish setting up the last connections.
            std::thread::sleep(Duration::from_millis(300));
            let (after, threads_after) = (proxy_rss(), proxy_threads());
            drop(connections);
            bed.release_held_connections();
            std::thread::sleep(Duration::from_millis(300));
            let per_thousand =
                after.saturating_sub(before) as f64 * 1000.0 / f64::from(options.held_connections);
            samples.record("proxy-memory.kib-per-1000", configuration, per_thousand);
            let threads = threads_after.saturating_sub(threads_before) as f64 * 1000.0
                / f64::from(options.held_connections);
            samples.record("proxy-memory.threads-per-1000", configuration, threads);
        }
        Workload::HandshakeFlood => {
            let Some(inbound) = &endpoints.inbound else {
                return Err(failed("no inbound port to flood".into()));
            };
            let pid = inbound.agent_pid;
            let (rss_before, threads_before) =
                (cpu::process_rss_kib(pid), cpu::process_threads(pid));
            let flood = workloads::flood(
                &inbound.flood_from,
                inbound.address,
                options.flood_connections,
            )
            .map_err(failed)?;
            // Let the agent take in what it accepted.
            std::thread::sleep(Duration::from_millis(500));
            let (rss, threads) = (cpu::process_rss_kib(pid), cpu::process_threads(pid));
            let (rate, failures) =
                workloads::connection_attempts(ns, endpoints.one_shot, options.short_duration)
                    .map_err(failed)?;
            progress_note(&format!(
                "handshake-flood {}: {} idle connections opened, {} refused at connect; \
                 agent {} → {} threads, {} → {} KiB; real clients {rate:.0}/s, {failures} failed",
                configuration.id(),
                flood.held.len(),
                flood.refused,
                threads_before,
                threads,
                rss_before,
                rss
            ));
            samples.record(
                "handshake-flood.agent-threads",
                configuration,
                threads as f64,
            );
            samples.record(
                "handshake-flood.agent-rss-growth-kib",
                configuration,
                rss.saturating_sub(rss_before) as f64,
            );
            samples.record("handshake-flood.real-connection-rate", configuration, rate);
            samples.record(
                "handshake-flood.real-connection-failures",
                configuration,
                failures as f64,
            );
            drop(flood);
            // Let the agent see the flood go before the next measurement.
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    Ok(())
}

fn write(options: &BenchOptions, results: BenchResults) -> Result<RunOutput> {
    let stamp = results.started_at.replace(':', "");
    let base = format!("{stamp}-{}", results.machine.host);
    let dir = &options.output_dir;
    let plot_dir = dir.join(&base);
    std::fs::create_dir_all(&plot_dir)
        .map_err(io_error(format!("cannot create {}", plot_dir.display())))?;

    let mut drawn = Vec::new();
    for metric in &results.metrics {
        let path = plot_dir.join(format!("{}.svg", metric.id));
        if plots::draw(metric, Configuration::Direct.id(), &path)? {
            drawn.push(metric.id.clone());
        }
    }
    let json = dir.join(format!("{base}.json"));
    let text = serde_json::to_string_pretty(&results)
        .map_err(|e| BenchError::Report(format!("cannot encode results: {e}")))?;
    std::fs::write(&json, text).map_err(io_error(format!("cannot write {}", json.display())))?;
    let markdown = report::render(&results, |id| {
        drawn
            .iter()
            .any(|d| d == id)
            .then(|| format!("{base}/{id}.svg"))
    });
    let report_path = dir.join(format!("{base}.md"));
    std::fs::write(&report_path, markdown)
        .map_err(io_error(format!("cannot write {}", report_path.display())))?;
    Ok(RunOutput {
        json,
        report: report_path,
        results,
    })
}

/// Clients at once in the parallel connection-rate measurement.
const PARALLEL_CLIENTS: usize = 8;

/// Holding 1,000 connections costs two descriptors each in this process.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// `read` of every proxy process, added up.
fn sum_over<T: std::iter::Sum<T>>(pids: &[u32], read: impl Fn(u32) -> T) -> T {
    pids.iter().map(|&pid| read(pid)).sum()
}

/// A line for the operator between progress updates (the bar redraws below it).
fn progress_note(line: &str) {
    eprintln!("\n{line}");
}
