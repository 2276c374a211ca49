//! Integration tests against the real kernel: the `ebpf-proxy` binary relays real sockets
//! over loopback. Every data-plane behaviour runs once per data plane (kernel, auto, splice,
//! copy); kernel-mode cases skip unless BPF loads, or fail when PROXY_REQUIRE_BPF=1.

mod cli;
mod flood;
mod lifecycle;
mod parity;
mod reliability;
mod resources;
mod soak;
mod transfer;

use integration_tests::Plane;

/// Instantiates each listed case as `<plane>::<case>` for every data plane.
macro_rules! for_each_plane {
    ($($module:ident :: $case:ident),* $(,)?) => {
        mod kernel { $( #[test] fn $case() { crate::$module::$case(crate::Plane::Kernel) } )* }
        mod auto { $( #[test] fn $case() { crate::$module::$case(crate::Plane::Auto) } )* }
        mod splice { $( #[test] fn $case() { crate::$module::$case(crate::Plane::Splice) } )* }
        mod copy { $( #[test] fn $case() { crate::$module::$case(crate::Plane::Copy) } )* }
    };
}

for_each_plane!(
    transfer::sizes_verify_each_direction_and_both,
    transfer::client_speaks_first_then_half_closes,
    transfer::upstream_speaks_first,
    transfer::upstream_half_closes_first,
    transfer::concurrent_connections_of_random_sizes_verify,
    transfer::ipv6_client_reaches_ipv4_upstream,
    transfer::overlapping_retransmission_goes_on_once,
    lifecycle::client_reset_reaches_upstream,
    lifecycle::upstream_reset_reaches_client,
    lifecycle::refused_upstream_closes_client,
    lifecycle::silent_upstream_closes_client_after_timeout,
    lifecycle::stops_cleanly_on_sigterm_and_sigint,
    lifecycle::restarts_on_its_port_at_once,
    resources::sequential_connections_leave_nothing_behind,
    resources::slow_reader_memory_is_bounded,
    resources::a_client_that_never_reads_its_echo_is_held_within_bounds,
    parity::metrics_count_the_bytes_sent,
    parity::idle_timeout_counts_traffic_both_ways,
    parity::half_closed_timeout_ends_a_one_sided_connection,
    parity::a_client_that_stops_reading_is_closed_when_idle,
    soak::soak_keeps_every_byte_and_leaks_nothing,
);

#[test]
fn kernel_falls_back_when_a_fin_came_first() {
    transfer::kernel_falls_back_when_a_fin_came_first();
}

#[test]
fn detached_flows_come_back_into_the_kernel_in_order() {
    transfer::detached_flows_come_back_into_the_kernel_in_order();
}

#[test]
fn auto_keeps_short_connections_in_userspace_and_moves_long_ones_into_the_kernel() {
    transfer::auto_keeps_short_connections_in_userspace_and_moves_long_ones_into_the_kernel();
}

#[test]
fn a_detached_flow_that_keeps_without_end_is_reset() {
    resources::a_detached_flow_that_keeps_without_end_is_reset();
}

#[test]
fn kernel_mode_moves_bytes_without_the_relay_process() {
    resources::kernel_mode_moves_bytes_without_the_relay_process();
}

#[test]
fn bpf_program_is_listed_while_running_and_gone_after() {
    lifecycle::bpf_program_is_listed_while_running_and_gone_after();
}
