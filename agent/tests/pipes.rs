//! Bulk transfers borrow pipes from a pool shared by the forwarding threads:
//! many transfers at once, round after round, arrive whole, and the
//! process's descriptors settle near where they were after the first round
//! (the pool keeps a few empty pipes, never one per transfer). Alone in its test
//! binary, so no other test moves the descriptor count.

mod common;

use common::{echo_bulk, echo_server, pod, wait_until, Fixture};
use serde_json::json;

/// Transfers at once: more than the pool keeps, and, both ways, more than
/// the number of large pipes it allows.
const TRANSFERS: usize = 24;
const SIZE: usize = 2 * 1024 * 1024;
/// Descriptors of the empty pipes the pool keeps at most (eight pipes, two
/// ends each).
const POOL_CEILING_FDS: usize = 16;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_bulk_transfers_share_a_few_pipes() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let echo = echo_server().await;
    let (code, _) = agent
        .push("create", json!([pod("bulk", "bulk", echo)]))
        .await;
    assert_eq!(code, 200);
    let port = agent.port_of("bulk").await;
    let payload: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();

    let mut settled = None;
    for round in 0..3 {
        let mut transfers = tokio::task::JoinSet::new();
        for _ in 0..TRANSFERS {
            transfers.spawn(echo_bulk(port, payload.clone()));
        }
        for back in common::within("the transfers", transfers.join_all()).await {
            assert!(
                back == payload,
                "bytes changed or cut ({} of {SIZE})",
                back.len()
            );
        }
        wait_until("every connection to close", || {
            agent.agent.status().redirections["bulk"].open_connections == 0
        })
        .await;
        let fds = open_fds();
        match settled {
            // The first round fills the pool, mostly: how many empty pipes
            // it keeps (up to its ceiling) depends on how many were lent at
            // once. A descriptor per transfer would be 24 a round.
            None => settled = Some(fds),
            Some(first) => assert!(
                fds <= first + POOL_CEILING_FDS,
                "round {round}: {fds} descriptors open, {first} after the first round: pipes leak"
            ),
        }
    }
    let moved = agent.redirection("bulk").await;
    assert_eq!(moved["bytes_to_pod"], (3 * TRANSFERS * SIZE) as u64);
    assert_eq!(moved["bytes_from_pod"], (3 * TRANSFERS * SIZE) as u64);
}
