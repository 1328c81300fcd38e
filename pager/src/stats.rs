//! Exporting VM metrics: OpenMetrics text through prometheus-client, and a tiny loopback-only HTTP responder
//! serving `/metrics`. (The human table of `pagewise stats` is the CLI's: agent/src/cli/stats.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::metrics::histogram::bucket_upper_us;
use crate::metrics::MetricsSnapshot;
use crate::server::Daemon;

/// Why the metrics endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsEndpointError {
    #[error("--metrics-addr {0} is not a loopback address; the endpoint is unauthenticated, so only 127.0.0.1 / ::1 are allowed")]
    NotLoopback(SocketAddr),
    #[error("binding the metrics endpoint {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The OpenMetrics content type `/metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One scrape: every VM's snapshot, encoded by prometheus-client on demand.
#[derive(Debug)]
struct Scrape(Vec<(String, MetricsSnapshot)>);

impl Scrape {
    /// Encode one metric: its descriptor, then one sample per VM (label `vm`).
    fn family(
        &self,
        encoder: &mut DescriptorEncoder,
        (name, help, unit, kind): (&str, &str, Option<&Unit>, MetricType),
        mut sample: impl FnMut(&MetricsSnapshot, MetricEncoder) -> Result<(), std::fmt::Error>,
    ) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
        for (vm, m) in &self.0 {
            let labels = [("vm", vm.as_str())];
            sample(m, metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Help text from a counter's doc comment (one line, trimmed).
fn help_of(doc: &str) -> String {
    doc.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let vms = encoder.encode_descriptor(
            "pagewise_vms",
            "VMs attached to the pager.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.0.len() as i64).encode(vms)?;
        if self.0.is_empty() {
            return Ok(()); // no per-VM family without a VM: each would have no sample
        }
        for (name, doc) in MetricsSnapshot::counter_help() {
            let value = move |m: &MetricsSnapshot| {
                m.counters()
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .map_or(0, |(_, v)| v)
            };
            match name {
                "inflight" => self.family(
                    &mut encoder,
                    ("pagewise_inflight", &help_of(doc), None, MetricType::Gauge),
                    |m, mut e| e.encode_gauge(&(value(m) as i64)),
                )?,
                "blocktime_ns" => self.family(
                    &mut encoder,
                    (
                        "pagewise_blocktime",
                        "Time faulting threads spent blocked, summed over every fault served.",
                        Some(&Unit::Seconds),
                        MetricType::Counter,
                    ),
                    |m, mut e| {
                        e.encode_counter::<NoLabelSet, _, f64>(&(value(m) as f64 / 1e9), None)
                    },
                )?,
                _ => self.family(
                    &mut encoder,
                    (
                        &format!("pagewise_{name}"),
                        &help_of(doc),
                        None,
                        MetricType::Counter,
                    ),
                    |m, mut e| e.encode_counter::<NoLabelSet, _, u64>(&value(m), None),
                )?,
            }
        }
        self.family(
            &mut encoder,
            (
                // The unit is in the name only: a UNIT line on a histogram is refused by some
                // OpenMetrics parsers (the test's among them).
                "pagewise_fault_latency_seconds",
                "Demand-fault latency in seconds: fault message read to page placed and thread woken.",
                None,
                MetricType::Histogram,
            ),
            |m, mut e| {
                let h = &m.fault_latency;
                let last = h.buckets.len().saturating_sub(1);
                let buckets: Vec<(f64, u64)> = h
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| {
                        let le = if i == last {
                            f64::INFINITY
                        } else {
                            bucket_upper_us(i) as f64 / 1e6
                        };
                        (le, c)
                    })
                    .collect();
                e.encode_histogram::<NoLabelSet>(h.sum_ns as f64 / 1e9, h.count(), &buckets, None)
            },
        )
    }
}

/// OpenMetrics text exposition (prometheus-client) of every VM's counters (`_total`),
/// in-flight gauge, blocked time in seconds and fault-latency histogram, labelled `vm`.
pub fn prometheus_text(vms: &[(String, MetricsSnapshot)]) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(vms.to_vec())));
    let mut out = String::new();
    encode(&mut out, &registry).expect("encoding into a String cannot fail");
    out
}

fn snapshots(daemon: &Daemon) -> Vec<(String, MetricsSnapshot)> {
    daemon
        .vms()
        .iter()
        .map(|vm| (vm.name.clone(), vm.metrics.snapshot()))
        .collect()
}

/// Bind `addr` (loopback only) and serve `GET /metrics` on a thread until the daemon stops.
pub fn spawn_metrics_endpoint(
    daemon: Arc<Daemon>,
    addr: SocketAddr,
) -> Result<std::thread::JoinHandle<()>, MetricsEndpointError> {
    if !addr.ip().is_loopback() {
        return Err(MetricsEndpointError::NotLoopback(addr));
    }
    let listener =
        TcpListener::bind(addr).map_err(|source| MetricsEndpointError::Bind { addr, source })?;
    let handle = std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || serve_http(&daemon, listener))
        .map_err(|source| MetricsEndpointError::Bind { addr, source })?;
    Ok(handle)
}

fn serve_http(daemon: &Arc<Daemon>, listener: TcpListener) {
    use std::os::fd::AsFd;
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while daemon.wait_readable(listener.as_fd(), "metrics endpoint") {
        let Ok((mut stream, _)) = listener.accept() else {
            continue;
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut req = [0u8; 2048];
        let n = stream.read(&mut req).unwrap_or(0);
        let first_line = String::from_utf8_lossy(&req[..n]);
        let (status, body, ctype) = if first_line.starts_with("GET /metrics ") {
            ("200 OK", prometheus_text(&snapshots(daemon)), CONTENT_TYPE)
        } else {
            (
                "404 Not Found",
                "only GET /metrics is served\n".to_string(),
                "text/plain",
            )
        };
        let resp = format!(
            "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(resp.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::VmMetrics;

    use openmetrics_parser::{openmetrics::parse_openmetrics, OpenMetricsType, OpenMetricsValue};

    fn two_vms() -> Vec<(String, MetricsSnapshot)> {
        let a = VmMetrics::default();
        VmMetrics::add(&a.faults, 3);
        VmMetrics::add(&a.blocktime_ns, 1_500_000_000);
        VmMetrics::add(&a.inflight, 7);
        a.fault_latency.record_ns(3_000);
        a.fault_latency.record_ns(100_000);
        let b = VmMetrics::default();
        VmMetrics::add(&b.faults, 5);
        vec![("vm\"1".into(), a.snapshot()), ("vm2".into(), b.snapshot())]
    }

    /// The exposition, read back by a strict OpenMetrics parser (not our own).
    #[test]
    fn exposition_parses_as_openmetrics_with_base_units_and_help() {
        let text = prometheus_text(&two_vms());
        let parsed = parse_openmetrics(&text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        let family = |name: &str| {
            parsed
                .families
                .get(name)
                .unwrap_or_else(|| panic!("no family {name}:\n{text}"))
        };
        let label = |vm: &str| vec![vm.to_string()];
        // Every counter of the JSON stats is there, typed, with help text and a vm label.
        for (name, _) in MetricsSnapshot::default().counters() {
            let (family_name, kind) = match name {
                "inflight" => ("pagewise_inflight".to_string(), OpenMetricsType::Gauge),
                "blocktime_ns" => (
                    "pagewise_blocktime_seconds".into(),
                    OpenMetricsType::Counter,
                ),
                _ => (format!("pagewise_{name}"), OpenMetricsType::Counter),
            };
            let f = family(&family_name);
            assert_eq!(f.family_type, kind, "{family_name}");
            assert!(!f.help.is_empty(), "{family_name} has no HELP");
            assert_eq!(f.get_label_names(), ["vm"], "{family_name}");
            assert_eq!(f.iter_samples().count(), 2, "{family_name}");
        }
        assert!(
            text.contains("pagewise_faults_total{vm=\"vm\\\"1\"} 3\n"),
            "{text}"
        );
        let total = |name: &str, vm: &str| match &family(name)
            .get_sample_by_label_values(&label(vm))
            .unwrap()
            .value
        {
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(total("pagewise_faults", "vm\"1"), 3.0);
        assert_eq!(total("pagewise_faults", "vm2"), 5.0);
        // Blocked time in seconds, not nanoseconds.
        let blocktime = family("pagewise_blocktime_seconds");
        assert_eq!(blocktime.unit, "seconds");
        assert_eq!(total("pagewise_blocktime_seconds", "vm\"1"), 1.5);
        match &family("pagewise_inflight")
            .get_sample_by_label_values(&label("vm\"1"))
            .unwrap()
            .value
        {
            OpenMetricsValue::Gauge(g) => assert_eq!(g.as_f64(), 7.0),
            other => panic!("{other:?}"),
        }
        // The latency histogram: seconds, cumulative buckets ending in +Inf.
        let latency = family("pagewise_fault_latency_seconds");
        assert_eq!(latency.family_type, OpenMetricsType::Histogram);
        let h = match &latency
            .get_sample_by_label_values(&label("vm\"1"))
            .unwrap()
            .value
        {
            OpenMetricsValue::Histogram(h) => h.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(h.count, Some(2));
        assert!((h.sum.as_ref().unwrap().as_f64() - 103e-6).abs() < 1e-12);
        let le = |bound: f64| {
            h.buckets
                .iter()
                .find(|b| b.upper_bound == bound)
                .map(|b| b.count.as_f64())
        };
        assert_eq!(le(0.000004), Some(1.0)); // 3 µs
        assert_eq!(le(0.000128), Some(2.0)); // and 100 µs
        assert_eq!(le(f64::INFINITY), Some(2.0));
        match &family("pagewise_vms").iter_samples().next().unwrap().value {
            OpenMetricsValue::Gauge(g) => assert_eq!(g.as_f64(), 2.0),
            other => panic!("{other:?}"),
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn no_vms_is_still_a_valid_exposition() {
        let text = prometheus_text(&[]);
        let parsed = parse_openmetrics(&text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        assert_eq!(parsed.families.len(), 1, "{text}");
        let vms = parsed.families["pagewise_vms"]
            .iter_samples()
            .next()
            .unwrap();
        assert!(
            matches!(&vms.value, OpenMetricsValue::Gauge(g) if g.as_f64() == 0.0),
            "{text}"
        );
    }

    #[test]
    fn refuses_non_loopback_addresses() {
        let d = crate::server::Daemon::new(Default::default(), Arc::new(NoSources)).unwrap();
        let err = spawn_metrics_endpoint(d, "0.0.0.0:0".parse().unwrap()).unwrap_err();
        assert!(matches!(err, MetricsEndpointError::NotLoopback(_)));
    }

    struct NoSources;
    impl crate::server::SourceProvider for NoSources {
        fn source_key(
            &self,
            vm: &str,
            _: Option<&str>,
        ) -> Result<String, crate::server::ProviderError> {
            Ok(vm.to_string())
        }
        fn open(
            &self,
            vm: &str,
            _: Option<&str>,
            _: &crate::vm::GuestLayout,
        ) -> Result<crate::server::OpenedSource, crate::server::ProviderError> {
            Err(crate::server::ProviderError::NotConfigured { vm: vm.into() })
        }
    }
}
