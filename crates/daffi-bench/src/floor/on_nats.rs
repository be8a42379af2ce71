//! The NATS floor: raw async-nats request-reply through the same nats-server as daffi's
//! NATS backend, with none of daffi's machinery (no membership, no argument encoding).
//! The server answers on `<name>.add`, counts `<name>.sink` and tells the count on
//! `<name>.count`; the client makes the calls.

use std::time::Instant;

use async_nats::Client;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::task::JoinSet;

use super::{SMALL_ARGS, SMALL_RESULT};
use crate::ops::{LatencyAnswer, Op, RateAnswer, RateMode};
use crate::proc::{answer, Result};
use crate::report::Percentiles;
use crate::roles::{runtime, wait_for_stdin_eof};

/// The server process: answers every request at once, counts one-way messages.
pub fn server(url: &str, name: &str) -> Result<()> {
    let rt = runtime()?;
    let client = rt.block_on(async_nats::connect(url))?;
    let mut requests = rt.block_on(client.subscribe(format!("{name}.>")))?;
    rt.block_on(client.flush())?;
    let serving = rt.spawn(async move {
        let mut one_way: u64 = 0;
        while let Some(message) = requests.next().await {
            let Some(reply) = message.reply else {
                one_way += 1;
                continue;
            };
            let body = if message.subject.ends_with(".count") {
                Bytes::from(std::mem::take(&mut one_way).to_be_bytes().to_vec())
            } else {
                Bytes::from_static(SMALL_RESULT)
            };
            let _ = client.publish(reply, body).await;
        }
    });
    println!("ready");
    wait_for_stdin_eof();
    serving.abort();
    rt.shutdown_background();
    Ok(())
}

/// The client process: runs the parent's commands against the server named `server`.
pub fn client(url: &str, server: &str) -> Result<()> {
    use std::io::BufRead;
    let rt = runtime()?;
    let client = rt.block_on(async_nats::connect(url))?;
    let subject = |what: &str| format!("{server}.{what}");
    let (add, sink, count) = (subject("add"), subject("sink"), subject("count"));
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let reply = match serde_json::from_str::<Op>(&line) {
            Ok(Op::Latency { calls, warmup, .. }) => {
                answer(rt.block_on(latency(&client, &add, calls, warmup)))
            }
            Ok(Op::Rate {
                mode: RateMode::Pipelined,
                calls,
                in_flight,
            }) => answer(rt.block_on(in_flight_rate(&client, &add, calls, in_flight))),
            Ok(Op::OneWay { calls, bytes }) => {
                answer(rt.block_on(one_way(&client, &sink, &count, calls, bytes)))
            }
            Ok(other) => answer::<()>(Err(format!("the NATS floor does not do {other:?}").into())),
            Err(e) => answer::<()>(Err(format!("bad command {line:?}: {e}").into())),
        };
        println!("{reply}");
    }
    rt.shutdown_background();
    Ok(())
}

async fn latency(client: &Client, add: &str, calls: usize, warmup: usize) -> Result<LatencyAnswer> {
    let args = Bytes::from_static(SMALL_ARGS);
    for _ in 0..warmup {
        client.request(add.to_string(), args.clone()).await?;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        client.request(add.to_string(), args.clone()).await?;
        samples.push(t.elapsed());
    }
    Percentiles::of(&mut samples).ok_or_else(|| "no calls measured".into())
}

/// `calls` requests, `in_flight` at a time: as many tasks, each making its share one
/// after another.
async fn in_flight_rate(
    client: &Client,
    add: &str,
    calls: usize,
    in_flight: usize,
) -> Result<RateAnswer> {
    let tasks = in_flight.clamp(1, calls.max(1));
    let started = Instant::now();
    let mut running = JoinSet::new();
    for t in 0..tasks {
        let share = calls / tasks + usize::from(t < calls % tasks);
        let (client, add) = (client.clone(), add.to_string());
        running.spawn(async move {
            for _ in 0..share {
                client
                    .request(add.clone(), Bytes::from_static(SMALL_ARGS))
                    .await?;
            }
            Ok::<(), async_nats::RequestError>(())
        });
    }
    while let Some(done) = running.join_next().await {
        done??;
    }
    Ok(RateAnswer {
        calls_per_s: calls as f64 / started.elapsed().as_secs_f64(),
        lost: 0,
    })
}

async fn one_way(
    client: &Client,
    sink: &str,
    count: &str,
    calls: usize,
    bytes: usize,
) -> Result<RateAnswer> {
    let body = Bytes::from(vec![0xA5u8; bytes]);
    let started = Instant::now();
    for _ in 0..calls {
        client.publish(sink.to_string(), body.clone()).await?;
    }
    let reply = client.request(count.to_string(), Bytes::new()).await?;
    let secs = started.elapsed().as_secs_f64();
    let counted = <[u8; 8]>::try_from(&reply.payload[..])
        .map(u64::from_be_bytes)
        .map_err(|_| "bad count reply")?;
    Ok(RateAnswer {
        calls_per_s: counted as f64 / secs,
        lost: (calls as u64).saturating_sub(counted),
    })
}
