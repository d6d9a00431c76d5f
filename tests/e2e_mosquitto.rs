//! The end-to-end scenarios against a real Mosquitto with `require_certificate true`.
//! CI sets SITERELAY_REQUIRE_MOSQUITTO=1, which turns a missing Mosquitto into a failure.

mod common;

use common::scenarios;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_thousand_messages_over_eight_connections_arrive_exactly_as_sent() {
    if !mosquitto_or_skip() {
        return;
    }
    scenarios::thousand_messages_over_eight_connections(Kind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_messages_acked_while_the_broker_is_down_arrive_in_order_once_it_is_up() {
    if !mosquitto_or_skip() {
        return;
    }
    scenarios::broker_down_then_up_delivers_everything_in_order(Kind::Mosquitto).await;
}
