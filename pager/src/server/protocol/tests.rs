//! Wire-format tests: round trips, versions, malformed lines.
use super::*;
use crate::server::error::render_chain;

#[test]
fn requests_round_trip_with_their_version() {
    let reqs = [
        Request::Ping,
        Request::Stats { vm: None },
        Request::Evict {
            vm: "a".into(),
            goal: EvictTarget::TargetRssBytes(1 << 20),
            batch_pages: Some(64),
            wait: true,
        },
        Request::Prepare(PrepareSpec {
            vm: "in".into(),
            layout: LayoutSpec {
                page_size: 4096,
                regions: vec![RegionSpec {
                    offset: 0,
                    size: 1 << 20,
                }],
            },
            swapdev: Some("/x.swap".into()),
            states: vec![StateRange {
                first_page: 3,
                count: 2,
                state: PageState::Zero,
            }],
            routes: vec![RouteRange {
                first_page: 0,
                count: 8,
                route: Route::Remote,
            }],
        }),
        Request::Census {
            vm: "a".into(),
            ranges: Some(RangeWindow::default()),
        },
    ];
    for r in reqs {
        let line = r.encode();
        assert!(line.starts_with("{\"v\":1,\"op\":"), "{line}");
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        assert_eq!(Request::decode(line.as_bytes()).unwrap(), r);
    }
    let line =
        br#"{"v":1,"op":"seed","vm":"a","states":[{"first_page":1,"count":2,"state":"evicted"}]}"#;
    assert_eq!(
        Request::decode(line).unwrap(),
        Request::Seed {
            vm: "a".into(),
            states: vec![StateRange {
                first_page: 1,
                count: 2,
                state: PageState::Evicted
            }],
            routes: vec![],
        }
    );
}

#[test]
fn malformed_requests_name_the_problem() {
    let err = |line: &str| render_chain(&Request::decode(line.as_bytes()).unwrap_err());
    assert!(err("{\"op\":\"ping\"}").contains("no protocol version"));
    assert!(err("{\"v\":2,\"op\":\"ping\"}").contains("version 2 is not supported"));
    assert!(err("[1]").contains("not a JSON object"));
    assert!(err("{nope").contains("not JSON"));
    let e = err("{\"v\":1,\"op\":\"frobnicate\"}");
    assert!(e.contains("unknown variant `frobnicate`"), "{e}");
    let e = err("{\"v\":1,\"op\":\"detach\"}");
    assert!(e.contains("missing field `vm`"), "{e}");
    let e = err("{\"v\":1,\"op\":\"ping\",\"extra\":1}");
    assert!(e.contains("unknown field `extra`"), "{e}");
    let e = err("{\"v\":1,\"op\":\"stats\",\"vn\":\"a\"}");
    assert!(e.contains("unknown field `vn`"), "{e}");
    let e = err(
        "{\"v\":1,\"op\":\"seed\",\"vm\":\"a\",\"states\":[{\"first_page\":0,\"count\":1,\"state\":\"gone\"}]}",
    );
    assert!(e.contains("unknown page state \"gone\""), "{e}");
    let e = err("{\"v\":1,\"op\":\"evict\",\"vm\":\"a\",\"goal\":{\"target_rss_bytes\":-1}}");
    assert!(e.contains("malformed request"), "{e}");
}

#[test]
fn responses_round_trip() {
    let rs = [
        Response::Pong { version: 1 },
        Response::Error {
            message: "no".into(),
        },
        Response::Census(CensusReport {
            vm: "a".into(),
            pages: 4,
            page_size: 4096,
            states: StateCounts {
                missing: 4,
                ..Default::default()
            },
            routes: RouteCounts {
                swapdev: 4,
                ..Default::default()
            },
            ranges: Some(vec![StateRange {
                first_page: 0,
                count: 4,
                state: PageState::Missing,
            }]),
            next_page: None,
        }),
    ];
    for r in rs {
        let line = r.encode();
        assert!(line.starts_with("{\"v\":1,\"kind\":"), "{line}");
        assert_eq!(Response::decode(line.as_bytes()).unwrap().encode(), line);
    }
}

/// A float a client sends comes back as exactly the f64 it printed: fuzz target
/// control_request found `cold_for_secs` 4444444444444444410133991.0 re-encoded as
/// 4.444444444444445e24, which serde_json's default (fast, not exact) float parsing read as
/// a neighbouring f64 (fixed with its `float_roundtrip` feature).
#[test]
fn float_fields_round_trip_exactly() {
    let line =
        br#"{"v":1,"op":"evict","vm":"a","goal":{"cold_for_secs":4444444444444444410133991.0}}"#;
    let request = Request::decode(line).unwrap();
    assert_eq!(
        Request::decode(request.encode().as_bytes()).unwrap(),
        request
    );
    for secs in [0.1, 2.5, 1e-300, 4.444444444444445e24, f64::MAX] {
        let r = Request::Evict {
            vm: "a".into(),
            goal: EvictTarget::ColdForSecs(secs),
            batch_pages: None,
            wait: false,
        };
        assert_eq!(Request::decode(r.encode().as_bytes()).unwrap(), r, "{secs}");
    }
}
