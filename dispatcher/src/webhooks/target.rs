//! Where a webhook may point: refusing requests the dispatcher would make
//! into its own network (SSRF). A URL must be `https`, and every address its
//! host resolves to must be public: not loopback, private, carrier-grade
//! NAT, link-local (the cloud metadata service, 169.254.169.254 and
//! fd00:ec2::254, is link-local or unique-local), unspecified, multicast,
//! broadcast or reserved. `SDXL_WEBHOOK_ALLOW_PRIVATE` lifts both rules (the
//! tests' receivers are on loopback).
//!
//! The check runs at submit (a 422 naming `webhook_url`) and again at each
//! delivery, whose HTTP client resolves through [`PublicResolver`], so that a
//! name that resolves elsewhere later (DNS rebinding) is refused too.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why `addr` is not a public address, if it is not.
pub fn non_public(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return non_public_v4(v4);
            }
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("a loopback address")
            } else if v6.is_unspecified() {
                Some("the unspecified address")
            } else if v6.is_multicast() {
                Some("a multicast address")
            } else if first & 0xfe00 == 0xfc00 {
                Some("a unique-local (private) address")
            } else if first & 0xffc0 == 0xfe80 {
                Some("a link-local address")
            } else if first == 0x2001 && v6.segments()[1] == 0x0db8 {
                Some("a documentation address")
            } else if v6.segments()[..6] == [0, 0, 0, 0, 0, 0] || first == 0x0064 && v6.segments()[1] == 0xff9b {
                // IPv4-compatible and NAT64 forms carry an IPv4 address.
                let [.., a, b] = v6.segments();
                non_public_v4(Ipv4Addr::from((u32::from(a) << 16) | u32::from(b)))
            } else {
                None
            }
        }
    }
}

fn non_public_v4(v4: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = v4.octets();
    if v4.is_loopback() {
        Some("a loopback address")
    } else if v4.is_private() {
        Some("a private address")
    } else if v4.is_link_local() {
        Some("a link-local address (the cloud metadata service is one)")
    } else if a == 100 && (64..128).contains(&b) {
        Some("a carrier-grade NAT (shared) address")
    } else if v4.is_unspecified() || a == 0 {
        Some("an unspecified (\"this network\") address")
    } else if v4.is_multicast() {
        Some("a multicast address")
    } else if v4.is_broadcast() || a >= 240 {
        Some("a reserved address")
    } else if v4.is_documentation() || a == 192 && b == 0 && v4.octets()[2] == 0 || a == 198 && (b == 18 || b == 19) {
        Some("a reserved (documentation, protocol or benchmarking) address")
    } else {
        None
    }
}

/// The longest a submit waits for DNS.
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the submit check says is wrong with `url`'s target.
pub async fn check(url: &str, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("is not a URL ({e})"))?;
    if parsed.scheme() != "https" {
        return Err("must use https (http is allowed only where the server sets SDXL_WEBHOOK_ALLOW_PRIVATE)".into());
    }
    let host = parsed.host().ok_or("has no host")?;
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs: Vec<IpAddr> = match host {
        url::Host::Ipv4(v4) => vec![IpAddr::V4(v4)],
        url::Host::Ipv6(v6) => vec![IpAddr::V6(v6)],
        url::Host::Domain(name) => tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name, port)))
            .await
            .map_err(|_| format!("has a host that did not resolve within {LOOKUP_TIMEOUT:?}"))?
            .map_err(|e| format!("has a host that does not resolve ({e})"))?
            .map(|a| a.ip())
            .collect(),
    };
    if addrs.is_empty() {
        return Err("has a host that resolves to no address".into());
    }
    for addr in addrs {
        if let Some(why) = non_public(addr) {
            return Err(format!(
                "must point at a public address, and {addr} is {why} (a server for tests may set SDXL_WEBHOOK_ALLOW_PRIVATE)"
            ));
        }
    }
    Ok(())
}

/// The deliverer's resolver: the system's, without the addresses that are
/// not public (unless private ones are allowed).
#[derive(Debug, Clone, Copy)]
pub struct PublicResolver {
    pub allow_private: bool,
}

impl Resolve for PublicResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| allow_private || non_public(a.ip()).is_none())
                .collect();
            if public.is_empty() {
                let e: Box<dyn std::error::Error + Send + Sync> =
                    format!("{} resolves to no public address", name.as_str()).into();
                return Err(e);
            }
            let addrs: Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_not_public() {
        for addr in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
        ] {
            assert!(non_public(ip(addr)).is_some(), "{addr}");
        }
        for addr in ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"] {
            assert_eq!(non_public(ip(addr)), None, "{addr}");
        }
    }

    #[tokio::test]
    async fn the_submit_check_wants_https_to_a_public_address() {
        assert!(check("https://93.184.216.34/hook", false).await.is_ok());
        let e = check("http://93.184.216.34/hook", false).await.unwrap_err();
        assert!(e.contains("https"), "{e}");
        for url in [
            "https://127.0.0.1:9/",
            "https://169.254.169.254/latest/meta-data/",
            "https://[::1]/",
            "https://10.0.0.7/",
            "https://localhost/",
        ] {
            let e = check(url, false).await.unwrap_err();
            assert!(e.contains("public address"), "{url}: {e}");
        }
        assert!(check("http://127.0.0.1:9/", true).await.is_ok());
    }
}
