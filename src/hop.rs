//! Hop-by-hop and forwarding headers.
//!
//! RFC 9110 §7.6.1: `Connection` and every header it names apply to one connection only and
//! are removed by a proxy before forwarding, in both directions; so are the fields that were
//! hop-by-hop by definition in RFC 2616 (`Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
//! `Transfer-Encoding`, `Upgrade`, `Proxy-Authenticate`, `Proxy-Authorization`).
//!
//! Forwarding headers (`X-Forwarded-*`, `Forwarded`) and our own `Vestibule-*` headers are
//! only ever set by us; what a client sent in their place is dropped, unless the peer is a
//! trusted proxy whose chain we extend.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// The client's address as vestibule decided it (docs/security.md): always ours.
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub const VESTIBULE_ROOM: HeaderName = HeaderName::from_static("vestibule-room");
pub const VESTIBULE_VISITOR: HeaderName = HeaderName::from_static("vestibule-visitor");
pub const VESTIBULE_TOKEN: HeaderName = HeaderName::from_static("vestibule-token");
/// A room's bypass secret (`[rooms.bypass]`); dropped before forwarding, as every `Vestibule-*`.
pub const VESTIBULE_BYPASS: HeaderName = HeaderName::from_static("vestibule-bypass");

/// Other proxies' and CDNs' names for the client's address: believed only from a trusted
/// proxy, dropped from anyone else.
fn names_a_client_address(name: &str) -> bool {
    matches!(
        name,
        "true-client-ip"
            | "x-client-ip"
            | "cf-connecting-ip"
            | "fastly-client-ip"
            | "x-cluster-client-ip"
            | "do-connecting-ip"
            | "forwarded-for"
            | "x-forwarded"
            | "x-original-forwarded-for"
            | "client-ip"
            | "x-proxyuser-ip"
            | "x-envoy-external-address"
            | "akamai-client-ip"
            | "x-akamai-client-ip"
            | "x-azure-clientip"
            | "x-appengine-user-ip"
            | "cloudfront-viewer-address"
            | "x-real-port"
            | "x-remote-ip"
            | "x-remote-addr"
            | "x-originating-ip"
            | "proxy-client-ip"
            | "wl-proxy-client-ip"
            | "x-host"
            | "x-original-host"
    )
}

/// Path overrides some upstreams route on (IIS rewrite, Zend): the gate decides on the path it
/// forwards, so a request outside the rooms must not name a path inside one. Dropped from
/// anyone, trusted proxies too.
fn overrides_the_path(name: &str) -> bool {
    matches!(name, "x-original-url" | "x-original-uri" | "x-override-url" | "x-rewrite-url" | "x-envoy-original-path")
}

/// Remove the hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names present is cheaper than
    // probing the map for each hop-by-hop name.
    let is_hop = |name: &HeaderName| HOP_BY_HOP.contains(name) || name == header::PROXY_AUTHENTICATE;
    if !headers.keys().any(is_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::PROXY_AUTHENTICATE);
}

/// Whether a message's `Connection` header lists `token` (`close`, `upgrade`).
pub fn connection_says(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|listed| listed.trim().eq_ignore_ascii_case(token))
}

/// The `Upgrade` value when the request asks for a websocket (HTTP/1.1 only). Any other
/// upgrade is not passed on: the request goes upstream as a plain one (its `Upgrade` and
/// `Connection` are hop-by-hop). An `h2c` upgrade, say, would open an HTTP/2 tunnel to the
/// upstream that carries requests for any path past the gate.
pub fn upgrade_requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_says_upgrade = connection_says(headers, "upgrade");
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    match (connection_says_upgrade, upgrades.next(), upgrades.next()) {
        (true, Some(protocol), None) if protocol.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket") => {
            Some(HeaderValue::from_static("websocket"))
        }
        _ => None,
    }
}

/// Re-add what an upgrade needs after the hop-by-hop headers were removed.
pub fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// What the forwarding headers say about the client connection; made once per connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client address, ready to be a header value.
    pub addr: HeaderValue,
    pub tls: bool,
    /// True when the address is one of `server.trusted_proxies`.
    pub trusted: bool,
}

impl Peer {
    pub fn new(addr: IpAddr, tls: bool, trusted: bool) -> Peer {
        let addr = HeaderValue::from_str(&addr.to_string()).expect("an IP address is a valid header value");
        Peer { addr, tls, trusted }
    }
}

/// The client's address (docs/design.md, security rules): the TCP peer; or, when the peer is one of the trusted
/// proxies, the right-most `X-Forwarded-For` entry that is not itself a trusted proxy (later
/// header lines are further right). An entry that is not an address stops the walk: the hop
/// that sent it is taken as the client, so a garbled chain can never name somebody else.
pub fn client_address(peer: IpAddr, trusted: &[ipnet::IpNet], headers: &HeaderMap) -> IpAddr {
    let is_trusted = |addr: &IpAddr| trusted.iter().any(|net| net.contains(addr));
    if !is_trusted(&peer) {
        return peer;
    }
    let lines: Vec<&str> = headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
    let mut client = peer;
    for entry in lines.iter().rev().flat_map(|line| line.rsplit(',')) {
        match parse_forwarded_for(entry.trim()) {
            Some(addr) => {
                client = addr;
                if !is_trusted(&addr) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_forwarded_for(entry: &str) -> Option<IpAddr> {
    if let Ok(addr) = entry.parse::<IpAddr>() {
        return Some(addr);
    }
    entry.parse::<std::net::SocketAddr>().ok().map(|socket| socket.ip())
}

/// The key under which per-address limits count a client: the address itself for IPv4 (and
/// IPv4-mapped IPv6), its /64 network for IPv6, since one IPv6 host can hold a whole /64.
pub fn address_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// Drop client-set forwarding and `Vestibule-*` headers (keeping a trusted proxy's chain) and
/// set ours. `host` is the host the client asked for, `client` the client's address as
/// [`client_address`] decided it (`X-Real-IP`).
pub fn set_forwarding_headers(headers: &mut HeaderMap, peer: &Peer, host: Option<&HeaderValue>, client: IpAddr) {
    let ours = |name: &HeaderName| {
        let name = name.as_str();
        let protected = |name: &str| {
            name.starts_with("vestibule-")
                || name == X_REAL_IP
                || overrides_the_path(name)
                || (!peer.trusted
                    && (name.starts_with("x-forwarded-") || name == header::FORWARDED || names_a_client_address(name)))
        };
        // An upstream behind CGI reads `X_Forwarded_For` as `X-Forwarded-For` (both are
        // HTTP_X_FORWARDED_FOR to it): such aliases of our names are ours too.
        protected(name) || (name.contains('_') && protected(&name.replace('_', "-")))
    };
    // Usually there is nothing to drop: look before collecting.
    if headers.keys().any(ours) {
        let dropped: Vec<HeaderName> = headers.keys().filter(|name| ours(name)).cloned().collect();
        for name in dropped {
            headers.remove(name);
        }
    }

    let proto = HeaderValue::from_static(if peer.tls { "https" } else { "http" });
    let real_ip = if peer.trusted {
        HeaderValue::from_str(&client.to_string()).expect("an IP address is a valid header value")
    } else {
        peer.addr.clone()
    };
    headers.insert(X_REAL_IP, real_ip);
    if peer.trusted {
        // A trusted proxy's chain is extended with the address it connected from.
        let chain: Vec<&str> = headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
        let value = match chain.as_slice() {
            [] => peer.addr.clone(),
            chain => {
                let client = peer.addr.to_str().unwrap_or_default();
                HeaderValue::from_str(&format!("{}, {client}", chain.join(", "))).unwrap_or_else(|_| peer.addr.clone())
            }
        };
        headers.insert(X_FORWARDED_FOR, value);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, proto);
        }
        if let (false, Some(host)) = (headers.contains_key(&X_FORWARDED_HOST), host) {
            headers.insert(X_FORWARDED_HOST, host.clone());
        }
        return;
    }
    headers.insert(X_FORWARDED_FOR, peer.addr.clone());
    headers.insert(X_FORWARDED_PROTO, proto);
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn removes_fixed_and_connection_named_headers() {
        let mut map = headers(&[
            ("connection", "close, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut map);
        assert_eq!(map.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);
    }

    #[test]
    fn untrusted_peer_cannot_spoof_forwarding_or_vestibule_headers() {
        let mut map = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "1"),
            ("forwarded", "for=6.6.6.6"),
            ("vestibule-room", "checkout"),
            ("Vestibule-Visitor", "someone-else"),
            ("x-real-ip", "6.6.6.6"),
            ("true-client-ip", "6.6.6.6"),
            ("x-client-ip", "6.6.6.6"),
            ("cf-connecting-ip", "6.6.6.6"),
            ("fastly-client-ip", "6.6.6.6"),
            ("x-cluster-client-ip", "6.6.6.6"),
            ("x-forwarded", "for=6.6.6.6"),
            ("client-ip", "6.6.6.6"),
            ("x-original-url", "/checkout"),
            ("x-original-forwarded-for", "6.6.6.6"),
            ("x_real_ip", "6.6.6.6"),
        ]);
        let peer = Peer::new("127.0.0.9".parse().unwrap(), false, false);
        set_forwarding_headers(
            &mut map,
            &peer,
            Some(&HeaderValue::from_static("shop.test")),
            "127.0.0.9".parse().unwrap(),
        );
        assert_eq!(map["x-forwarded-for"], "127.0.0.9");
        assert_eq!(map["x-real-ip"], "127.0.0.9");
        assert_eq!(map.get_all("x-real-ip").iter().count(), 1);
        assert_eq!(map["x-forwarded-proto"], "http");
        assert_eq!(map["x-forwarded-host"], "shop.test");
        for gone in [
            "x-forwarded-port",
            "forwarded",
            "vestibule-room",
            "vestibule-visitor",
            "true-client-ip",
            "x-client-ip",
            "cf-connecting-ip",
            "fastly-client-ip",
            "x-cluster-client-ip",
            "x-forwarded",
            "client-ip",
            "x-original-url",
            "x-original-forwarded-for",
            "x_real_ip",
        ] {
            assert!(!map.contains_key(gone), "{gone} should be dropped");
        }
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_says_otherwise() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "192.168.1.1/32".parse().unwrap()];
        let at = |peer: &str, pairs: &[(&str, &str)]| {
            client_address(peer.parse().unwrap(), &trusted, &headers(pairs)).to_string()
        };
        // An untrusted peer is the client, whatever it says.
        assert_eq!(at("203.0.113.9", &[("x-forwarded-for", "1.2.3.4")]), "203.0.113.9");
        // A trusted peer: the right-most entry that is not a trusted proxy.
        assert_eq!(at("10.0.0.2", &[("x-forwarded-for", "1.2.3.4")]), "1.2.3.4");
        assert_eq!(at("10.0.0.2", &[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 192.168.1.1")]), "1.2.3.4");
        assert_eq!(at("10.0.0.2", &[("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "1.2.3.4:443")]), "1.2.3.4");
        assert_eq!(at("10.0.0.2", &[("x-forwarded-for", "[2001:db8::1]:80, 10.1.1.1")]), "2001:db8::1");
        // Only trusted hops: the left-most; none: the peer; garbage: the hop that sent it.
        assert_eq!(at("10.0.0.2", &[("x-forwarded-for", "10.9.9.9, 192.168.1.1")]), "10.9.9.9");
        assert_eq!(at("10.0.0.2", &[]), "10.0.0.2");
        assert_eq!(at("10.0.0.2", &[("x-forwarded-for", "1.2.3.4, unknown, 10.3.3.3")]), "10.3.3.3");
        assert_eq!(at("10.0.0.2", &[("x-forwarded-for", "1.2.3.4, not-an-address")]), "10.0.0.2");
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64() {
        let key = |addr: &str| address_key(addr.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::");
        assert_eq!(key("::ffff:203.0.113.9"), "203.0.113.9");
        assert_eq!(key("203.0.113.9"), "203.0.113.9");
    }

    #[test]
    fn trusted_peer_chain_is_extended() {
        let mut map = headers(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-real-ip", "6.6.6.6"),
            ("cf-connecting-ip", "203.0.113.7"),
        ]);
        let peer = Peer::new("10.0.0.2".parse().unwrap(), false, true);
        set_forwarding_headers(&mut map, &peer, None, "203.0.113.7".parse().unwrap());
        assert_eq!(map["x-forwarded-for"], "203.0.113.7, 10.0.0.2");
        assert_eq!(map["x-forwarded-proto"], "https");
        assert_eq!(map["x-real-ip"], "203.0.113.7", "ours, the client's address");
        assert_eq!(map["cf-connecting-ip"], "203.0.113.7", "a trusted proxy's own header is kept");
    }
}
