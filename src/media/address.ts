/**
 * Which IP addresses a media fetch may connect to. Private-network
 * protection refuses every address that is not plainly public: loopback,
 * RFC 1918 / ULA private ranges, link-local (where the cloud metadata
 * services live), CGNAT, multicast, unspecified, documentation and reserved
 * ranges, for IPv4 and IPv6 alike. IPv6 forms that carry an IPv4 address
 * (IPv4-mapped, IPv4-compatible, NAT64, 6to4) are judged by that address, so
 * `::ffff:127.0.0.1` is loopback too.
 */

import { isIPv4, isIPv6 } from 'node:net'

/** An address as its bytes (4 for IPv4, 16 for IPv6). */
type Bytes = number[]

function v4Bytes(s: string): Bytes {
  return s.split('.').map(Number)
}

/** 16 bytes of an IPv6 address (Node has checked its syntax). */
function v6Bytes(s: string): Bytes {
  let text = s.split('%')[0]!.toLowerCase()
  // A trailing dotted quad (::ffff:1.2.3.4) is two 16-bit groups.
  const quad = /(\d+\.\d+\.\d+\.\d+)$/.exec(text)
  if (quad) {
    const [a, b, c, d] = v4Bytes(quad[1]!)
    text = text.slice(0, quad.index) + `${((a! << 8) | b!).toString(16)}:${((c! << 8) | d!).toString(16)}`
  }
  const [head, tail] = text.includes('::') ? text.split('::') : [text, undefined]
  const groups = (g: string | undefined): number[] => (g ? g.split(':').map((x) => parseInt(x, 16)) : [])
  const h = groups(head)
  const t = groups(tail)
  const all = tail === undefined ? h : [...h, ...new Array<number>(8 - h.length - t.length).fill(0), ...t]
  return all.flatMap((g) => [g >> 8, g & 0xff])
}

/** Does `bytes` lie in `prefix`/`bits`? */
function inRange(bytes: Bytes, prefix: Bytes, bits: number): boolean {
  for (let i = 0; i < bits; i++) {
    const byte = i >> 3
    const mask = 0x80 >> (i & 7)
    if ((bytes[byte]! & mask) !== (prefix[byte]! & mask)) return false
  }
  return true
}

interface Range {
  prefix: Bytes
  bits: number
  what: string
}

const range = (cidr: string, what: string): Range => {
  const [addr, bits] = cidr.split('/') as [string, string]
  return { prefix: isIPv4(addr) ? v4Bytes(addr) : v6Bytes(addr), bits: Number(bits), what }
}

// The cloud metadata address first so it is named as such.
const V4_BLOCKED: Range[] = [
  range('169.254.169.254/32', 'cloud metadata'),
  range('100.100.100.200/32', 'cloud metadata'),
  range('0.0.0.0/8', 'unspecified ("this network")'),
  range('10.0.0.0/8', 'private'),
  range('100.64.0.0/10', 'carrier-grade NAT'),
  range('127.0.0.0/8', 'loopback'),
  range('169.254.0.0/16', 'link-local'),
  range('172.16.0.0/12', 'private'),
  range('192.0.0.0/24', 'IETF protocol assignment'),
  range('192.0.2.0/24', 'documentation'),
  range('192.88.99.0/24', 'reserved (6to4 relay)'),
  range('192.168.0.0/16', 'private'),
  range('198.18.0.0/15', 'benchmarking'),
  range('198.51.100.0/24', 'documentation'),
  range('203.0.113.0/24', 'documentation'),
  range('224.0.0.0/4', 'multicast'),
  range('240.0.0.0/4', 'reserved'),
]

const V6_BLOCKED: Range[] = [
  range('fd00:ec2::254/128', 'cloud metadata'),
  range('::/128', 'unspecified'),
  range('::1/128', 'loopback'),
  range('100::/64', 'discard-only'),
  range('2001:db8::/32', 'documentation'),
  range('2001::/23', 'IETF protocol assignment'),
  range('fc00::/7', 'private (unique local)'),
  range('fe80::/10', 'link-local'),
  range('fec0::/10', 'site-local'),
  range('ff00::/8', 'multicast'),
]

/** IPv6 forms that embed an IPv4 address: where its 4 bytes start. */
const V4_CARRIERS: Array<{ range: Range; at: number }> = [
  { range: range('::ffff:0:0/96', 'IPv4-mapped'), at: 12 },
  { range: range('::/96', 'IPv4-compatible'), at: 12 },
  { range: range('64:ff9b::/96', 'NAT64'), at: 12 },
  { range: range('64:ff9b:1::/48', 'local NAT64'), at: 12 },
  { range: range('2002::/16', '6to4'), at: 2 },
]

function firstMatch(bytes: Bytes, ranges: Range[]): string | undefined {
  return ranges.find((r) => inRange(bytes, r.prefix, r.bits))?.what
}

/**
 * Why `address` must not be fetched from (e.g. `'loopback'`), or undefined
 * for a public address. Anything that is not an IP address is refused.
 */
export function blockedReason(address: string): string | undefined {
  const bare = address.startsWith('[') && address.endsWith(']') ? address.slice(1, -1) : address
  if (isIPv4(bare)) return firstMatch(v4Bytes(bare), V4_BLOCKED)
  if (!isIPv6(bare)) return 'not an IP address'
  const bytes = v6Bytes(bare)
  const own = firstMatch(bytes, V6_BLOCKED)
  if (own) return own
  for (const c of V4_CARRIERS) {
    if (!inRange(bytes, c.range.prefix, c.range.bits)) continue
    // ::/96 also holds :: and ::1, handled above.
    const v4 = firstMatch(bytes.slice(c.at, c.at + 4), V4_BLOCKED)
    if (v4) return `${v4} (${c.range.what})`
  }
  return undefined
}

/** Is `host` (a URL's hostname, IPv6 with or without brackets) an IP literal? */
export function isIpLiteral(host: string): boolean {
  const bare = host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host
  return isIPv4(bare) || isIPv6(bare)
}
