//! The operator's HTTP endpoint: health, readiness and Prometheus metrics.

use std::sync::Arc;

use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fixture::TestServer;

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: meshgate\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let server = TestServer::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gateway = Arc::clone(&server.gateway);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(async move {
        gateway
            .serve_http(listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });

    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_string()));
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 200);
    assert!(body.contains("10 products published"), "{body}");

    let mut client = server.unrestricted().await;
    client.query("SELECT * FROM crm.region").await.unwrap();
    client.query("SELECT 1 / 0").await.unwrap_err();
    let (status, text) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(&text, "meshgate_queries_total{outcome=\"ok\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "meshgate_queries_total{outcome=\"error\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "meshgate_product_queries_total{product=\"crm.region\",outcome=\"ok\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "meshgate_rows_returned_total"),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "meshgate_active_queries"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "meshgate_query_duration_seconds_count"),
        Some(2.0),
        "{text}"
    );

    // A client that goes away mid-stream frees its query.
    let command = CommandStatementQuery {
        query: "SELECT value FROM range(100000000000)".into(),
        transaction_id: None,
    };
    let info = client.flight_info(command.as_any()).await.unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let request = client.request(ticket);
    let mut stream = client.inner.do_get(request).await.unwrap().into_inner();
    assert!(stream.next().await.is_some());
    let (_, text) = get(addr, "/metrics").await;
    assert_eq!(
        metric(&text, "meshgate_active_queries"),
        Some(1.0),
        "{text}"
    );
    drop(stream);
    let mut active = None;
    for _ in 0..100 {
        let (_, text) = get(addr, "/metrics").await;
        active = metric(&text, "meshgate_active_queries");
        if active == Some(0.0) {
            let cancelled = metric(&text, "meshgate_queries_total{outcome=\"cancelled\"}");
            assert_eq!(cancelled, Some(1.0), "{text}");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(active, Some(0.0));

    stop.send(()).unwrap();
    http.await.unwrap();
    server.stop().await;
}
