//! Integration tests against the real kernel: the `ebpf-proxy` binary relays real sockets
//! over loopback. Each case is a function in the module of its feature, registered here
//! and only here, by `cases!`: a case that relays takes the data plane it runs on and is
//! listed under the planes it applies to, and shows up as `<case>::<plane>`; a case of the
//! control plane alone (flags, configuration, signals) takes none. Kernel-mode cases skip
//! unless BPF loads, or fail when PROXY_REQUIRE_BPF=1. A case listed as `ignored` measures a
//! target not met yet, says why, and runs with `-- --ignored`.

mod acme;
mod cli;
mod flood;
mod lifecycle;
mod memory;
mod parity;
mod probing;
mod reliability;
mod resources;
mod side_by_side;
mod soak;
mod transfer;

/// Registers each listed case: under `[planes]`, as a module named after the case with a
/// test per plane; under `[]`, as one test of that name.
macro_rules! cases {
    (ignored $why:literal [$($plane:ident),+] => $module:ident::$case:ident) => {
        mod $case {
            $( #[test] #[ignore = $why] fn $plane() { crate::$module::$case(plane!($plane)) } )+
        }
    };
    ([] => $($module:ident::$case:ident),+ $(,)?) => {
        $( #[test] fn $case() { crate::$module::$case() } )+
    };
    ($planes:tt => $($module:ident::$case:ident),+ $(,)?) => {
        $( cases!(@planes $planes $module::$case); )+
    };
    (@planes [$($plane:ident),+] $module:ident::$case:ident) => {
        mod $case {
            $( #[test] fn $plane() { crate::$module::$case(plane!($plane)) } )+
        }
    };
}

macro_rules! plane {
    (kernel) => {
        integration_tests::Plane::Kernel
    };
    (auto) => {
        integration_tests::Plane::Auto
    };
    (splice) => {
        integration_tests::Plane::Splice
    };
    (copy) => {
        integration_tests::Plane::Copy
    };
}

// Every data-plane behaviour, on every data plane.
cases!([kernel, auto, splice, copy] =>
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
    memory::a_memory_limit_holds_never_readers_and_serves_others,
    memory::shedding_resets_the_biggest_holders_only,
    memory::never_readers_on_small_segments_are_held_or_reset,
    parity::metrics_count_the_bytes_sent,
    parity::idle_timeout_counts_traffic_both_ways,
    parity::half_closed_timeout_ends_a_one_sided_connection,
    parity::half_closed_timeout_spares_a_direction_still_moving,
    parity::a_client_that_stops_reading_is_closed_when_idle,
    parity::a_never_reader_to_an_echo_is_closed_when_idle,
    probing::probes_get_the_fallback_site_and_whatsapp_clients_their_pool,
    soak::soak_keeps_every_byte_and_leaks_nothing,
);

// The kernel data plane's own machinery: the maps, the program, detaching and resuming.
cases!([kernel] =>
    transfer::kernel_falls_back_when_a_fin_came_first,
    transfer::detached_flows_come_back_into_the_kernel_in_order,
    resources::a_detached_flow_that_keeps_without_end_is_reset,
    resources::budgets_follow_each_destination_drain_rate,
    resources::kernel_mode_moves_bytes_without_the_relay_process,
    lifecycle::bpf_program_is_listed_while_running_and_gone_after,
    lifecycle::bpftool_and_the_flows_view_show_a_live_connection,
    reliability::full_kernel_maps_fall_back_to_userspace,
    reliability::kernel_mode_runs_unprivileged_with_three_capabilities,
);

// What slow clients cost, side by side with HAProxy (kernel-mode memory, issue 18).
cases!([kernel, auto] => side_by_side::slow_readers_cost_no_more_than_through_haproxy);

// A target of issue 18 not met reliably: run with `-- --ignored` to measure it.
cases!(ignored "not met: kernel mode never holds never-readers, a throttled sender's zero-window probes trickle on (docs/reliability.md)"
    [kernel, auto] => side_by_side::never_readers_cost_no_more_than_through_haproxy);

// auto's warm-up, which only auto has.
cases!([auto] =>
    transfer::auto_keeps_short_connections_in_userspace_and_moves_long_ones_into_the_kernel,
);

// Per-address limits refuse before any data plane is involved; splice relays what passes.
cases!([splice] => parity::per_ip_limits_refuse_only_the_extra_connection);

// The control plane: flags, configuration, peers' headers and TLS, signals, reload and
// resources; each picks the data plane it needs, if any.
cases!([] =>
    acme::acme_certificate_from_pebble_is_served_and_kept_across_restarts,
    acme::acme_tls_alpn_validation_and_renewal_keep_connections,
    cli::malformed_forward_is_a_usage_error,
    cli::port_in_use_says_so,
    cli::a_name_that_does_not_resolve_yet_delays_nothing_but_its_pool,
    cli::without_privileges_auto_falls_back_and_kernel_says_why,
    flood::flood_from_many_addresses_keeps_limits_and_service,
    flood::one_address_is_never_refused,
    parity::preset_port_table_end_to_end,
    parity::haproxy_accepts_our_v1_and_v2_headers,
    parity::haproxy_send_proxy_v2_in_front_is_accepted,
    parity::openssl_completes_tls_on_tls_listeners,
    parity::bad_handshakes_are_cut_off_without_disturbing_others,
    parity::client_addresses_stay_out_of_logs_unless_asked,
    parity::check_names_the_line_and_the_preset_passes_it,
    parity::pool_fails_over_to_the_next_server_and_reports_health,
    parity::listener_limit_queues_the_extra_client_until_a_slot_frees,
    reliability::sigterm_drains_open_connections_then_exits,
    reliability::sighup_reloads_listeners_and_limits_while_connections_flow,
    reliability::sighup_rereads_the_tls_certificate,
    reliability::restart_after_sigkill_is_clean,
    reliability::out_of_descriptors_slows_accepting_logs_once_and_recovers,
    reliability::nothing_a_client_sends_steers_the_connection,
    reliability::systemd_unit_passes_systemd_analyze_verify,
);
