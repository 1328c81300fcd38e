//! Exporting VM metrics: Prometheus text format, and a tiny loopback-only HTTP responder
//! serving `/metrics`. (The human table of `pagewise stats` is the CLI's: agent/src/cli/stats.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

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

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition of every VM's counters and latency histogram.
pub fn prometheus_text(vms: &[(String, MetricsSnapshot)]) -> String {
    let mut out = String::new();
    let Some((_, first)) = vms.first() else {
        return "# no VMs attached\n".into();
    };
    for (name, _) in first.counters() {
        let kind = if name == "inflight" {
            "gauge"
        } else {
            "counter"
        };
        out.push_str(&format!("# TYPE pagewise_{name} {kind}\n"));
        for (vm, m) in vms {
            let v = m
                .counters()
                .into_iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, v)| v);
            out.push_str(&format!(
                "pagewise_{name}{{vm=\"{}\"}} {v}\n",
                escape_label(vm)
            ));
        }
    }
    out.push_str("# TYPE pagewise_fault_latency_seconds histogram\n");
    for (vm, m) in vms {
        let vm = escape_label(vm);
        let h = &m.fault_latency;
        let mut cumulative = 0;
        let last = h.buckets.len().saturating_sub(1);
        for (i, c) in h.buckets.iter().enumerate() {
            cumulative += c;
            if i == last {
                break;
            }
            let le = bucket_upper_us(i) as f64 / 1e6;
            out.push_str(&format!(
                "pagewise_fault_latency_seconds_bucket{{vm=\"{vm}\",le=\"{le}\"}} {cumulative}\n"
            ));
        }
        out.push_str(&format!(
            "pagewise_fault_latency_seconds_bucket{{vm=\"{vm}\",le=\"+Inf\"}} {}\n",
            h.count()
        ));
        out.push_str(&format!(
            "pagewise_fault_latency_seconds_sum{{vm=\"{vm}\"}} {}\n",
            h.sum_ns as f64 / 1e9
        ));
        out.push_str(&format!(
            "pagewise_fault_latency_seconds_count{{vm=\"{vm}\"}} {}\n",
            h.count()
        ));
    }
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
            (
                "200 OK",
                prometheus_text(&snapshots(daemon)),
                "text/plain; version=0.0.4",
            )
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

    #[test]
    fn prometheus_exposition_has_counters_and_cumulative_buckets() {
        let m = VmMetrics::default();
        VmMetrics::add(&m.faults, 3);
        m.fault_latency.record_ns(3_000);
        m.fault_latency.record_ns(100_000);
        let text = prometheus_text(&[("vm\"1".into(), m.snapshot())]);
        assert!(
            text.contains("pagewise_faults{vm=\"vm\\\"1\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("le=\"0.000004\"} 1\n"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 2\n"), "{text}");
        assert!(text.contains("pagewise_fault_latency_seconds_count{vm=\"vm\\\"1\"} 2\n"));
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
