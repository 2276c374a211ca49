//! The configuration's unit tests: presets, overrides, fallbacks and errors by line.

use super::*;

fn from_text(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
    Builder {
        origin: "test.toml",
        text,
    }
    .build(overrides)
}

/// Each listener of `preset` as (port, accept_proxy, tls, send_proxy, first server).
fn port_table(preset: Preset) -> Vec<(u16, bool, bool, HeaderVersion, String)> {
    let config = Config::load(&Source::Preset(preset), &Overrides::default()).unwrap();
    config
        .listeners
        .iter()
        .map(|l| {
            let pool = &config.pools[l.pool];
            (
                l.listen.port(),
                l.accept_proxy,
                l.tls,
                l.send_proxy,
                pool.servers[0].to_string(),
            )
        })
        .collect()
}

#[test]
fn whatsapp_preset_is_the_port_table() {
    use HeaderVersion::*;
    let expected = [
        (80, false, false, V1, "g.whatsapp.net:80"),
        (8080, true, false, V1, "g.whatsapp.net:80"),
        (443, false, true, V1, "g.whatsapp.net:5222"),
        (8443, true, true, V1, "g.whatsapp.net:5222"),
        (5222, false, false, V1, "g.whatsapp.net:5222"),
        (8222, true, false, V1, "g.whatsapp.net:5222"),
        (587, false, false, None, "whatsapp.net:443"),
        (7777, false, false, None, "whatsapp.net:443"),
    ]
    .map(|(p, a, t, h, s)| (p, a, t, h, s.to_owned()));
    assert_eq!(port_table(Preset::Whatsapp), expected);
}

#[test]
fn quiet_preset_is_443_and_587_as_in_the_full_table() {
    let full = port_table(Preset::Whatsapp);
    let quiet: Vec<_> = full
        .into_iter()
        .filter(|(port, ..)| [443, 587].contains(port))
        .collect();
    assert_eq!(port_table(Preset::WhatsappQuiet), quiet);
}

#[test]
fn command_line_overrides_the_file() {
    let mut overrides = Overrides {
        bind: Some("127.0.0.1".parse().unwrap()),
        pins: vec!["g.whatsapp.net=127.0.0.2".parse().unwrap()],
        forwards: vec!["127.0.0.1:9000=localhost:22".parse().unwrap()],
        ..Overrides::default()
    };
    overrides.settings.timeouts.idle = Some(Duration::from_secs(7));
    overrides.settings.limits.max_connections = Some(10);
    let config = from_text(Preset::Whatsapp.text(), &overrides).unwrap();
    assert!(
        config.listeners[..8]
            .iter()
            .all(|l| l.listen.ip() == overrides.bind.unwrap())
    );
    assert_eq!(config.timeouts.idle, Duration::from_secs(7));
    assert_eq!(config.timeouts.connect, Duration::from_secs(5));
    assert_eq!(config.limits.max_connections, 10);
    assert_eq!(
        config.pins["g.whatsapp.net"],
        vec!["127.0.0.2".parse::<IpAddr>().unwrap()]
    );
    let forward = config.listeners.last().unwrap();
    assert_eq!(
        config.pools[forward.pool].servers[0].to_string(),
        "localhost:22"
    );
    assert_eq!(forward.send_proxy, HeaderVersion::None);
}

#[test]
fn the_relay_fallback_reaches_the_files_listeners_not_forwards() {
    let mut overrides = Overrides {
        forwards: vec!["127.0.0.1:9000=localhost:22".parse().unwrap()],
        ..Overrides::default()
    };
    overrides.settings.relay.fallback = Some("127.0.0.1:8080".parse().unwrap());
    let config = from_text(Preset::Whatsapp.text(), &overrides).unwrap();
    let (preset, forward) = config.listeners.split_at(8);
    let fallback = preset[0]
        .fallback
        .expect("the preset's listeners fall back");
    assert!(preset.iter().all(|l| l.fallback == Some(fallback)));
    assert_eq!(
        config.pools[fallback].servers[0].to_string(),
        "127.0.0.1:8080"
    );
    assert_eq!(
        (forward[0].fallback, forward[0].expect),
        (None, Expect::Any)
    );
    let expects: Vec<Expect> = preset.iter().map(|l| l.expect).collect();
    assert_eq!(expects[..6], [Expect::Whatsapp; 6]);
    assert_eq!(
        expects[6..],
        [Expect::Tls; 2],
        "media ports carry the client's TLS"
    );
    // Without the setting nothing falls back.
    let config = from_text(Preset::Whatsapp.text(), &Overrides::default()).unwrap();
    assert!(config.listeners.iter().all(|l| l.fallback.is_none()));
}

#[test]
fn a_listeners_own_fallback_wins_and_any_never_falls_back() {
    let text = "[relay]\nfallback = \"127.0.0.1:80\"\n[pools.p]\nservers = [\"a:1\"]\n\
        [[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"p\"\nfallback = \"[::1]:81\"\n\
        [[listener]]\nlisten = \"127.0.0.1:2\"\npool = \"p\"\nexpect = \"any\"\n\
        [[listener]]\nlisten = \"127.0.0.1:3\"\npool = \"p\"\n";
    let config = from_text(text, &Overrides::default()).unwrap();
    let server = |l: &ListenerConfig| l.fallback.map(|i| config.pools[i].servers[0].to_string());
    let servers: Vec<_> = config.listeners.iter().map(server).collect();
    assert_eq!(
        servers,
        [
            Some("[::1]:81".to_owned()),
            None,
            Some("127.0.0.1:80".to_owned())
        ]
    );
}

/// Inputs kept in fuzz/regressions/config: each gives a configuration or an error whose
/// line exists, never a panic.
#[test]
fn fuzz_regressions_stay_fixed() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/regressions/config");
    for entry in std::fs::read_dir(dir).expect("regressions directory") {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        if let Err(e) = from_text(&text, &Overrides::default())
            && let Some(line) = e.line
        {
            assert!((1..=text.split('\n').count()).contains(&line), "{e}");
        }
    }
}

#[test]
fn errors_name_their_line() {
    let check = |text: &str, line: usize, needle: &str| {
        let e = from_text(text, &Overrides::default()).unwrap_err();
        assert_eq!(e.line, Some(line), "{e}");
        assert!(e.to_string().contains(needle), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("test.toml line {line}: ")),
            "{e}"
        );
    };
    let pool = "[pools.p]\nservers = [\"a:1\"]\n";
    check(
        &format!("{pool}[[listener]]\nlisten = \"1.2.3.4\"\npool = \"p\"\n"),
        4,
        "socket address",
    );
    check(
        &format!("{pool}[[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"q\"\n"),
        5,
        "no pool named \"q\"",
    );
    check("[pools.p]\nservers = [\"nohost\"]\n", 2, "is not HOST:PORT");
    check("[pools.p]\nservers = []\n", 2, "has no servers");
    check("[timeouts]\n\nidle = \"10 parsecs\"\n", 3, "unknown unit");
    check("[relay]\ndataplane = \"warp\"\n", 2, "unknown data plane");
    check("[relay]\nspeed = 1\n", 2, "unknown field");
    check("[limits]\nmax_connections = 0\n", 2, "must be 1-1000000");
    check("[tls]\ncert = \"/c.pem\"\n", 2, "give both");
    check(
        &format!(
            "{pool}[[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"p\"\n[[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"p\"\n"
        ),
        7,
        "listened on twice",
    );
    check(
        &format!(
            "{pool}[[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"p\"\nexpect = \"any\"\nfallback = \"a:80\"\n"
        ),
        7,
        "a fallback needs expect",
    );
    check(
        &format!("{pool}[[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"p\"\nexpect = \"xmpp\"\n"),
        6,
        "unknown variant",
    );
    check("[relay]\nfallback = \"nowhere\"\n", 2, "is not HOST:PORT");
    check("[[listener]\n", 1, "");
    let e = from_text("", &Overrides::default()).unwrap_err();
    assert!(e.message.contains("no listeners"), "{e}");
}
