// Loopback nodes of an independent BEP 5 implementation (npm's bittorrent-dht), driven over
// stdin/stdout by tests/integration/test_dht_interop.py.
//
//   node dht_node.mjs [--nodes N] [--bootstrap 127.0.0.1:PORT[,127.0.0.1:PORT...]|none]
//
// Starts N nodes (default 1, at most 64; `add` makes more) on 127.0.0.1, each on a port the
// kernel picks. Node 0 uses the
// given bootstrap list (default none); node i > 0 bootstraps from node 0 (and the given list).
// For each node it prints `node <i> <port> <id-hex>`, then `ready <port0> <port1> ...`.
//
// Commands, one a line; every answer line starts with a word naming it and, where it
// matters, the node index and the key, so that answers to commands running at once can be
// told apart:
//   add <bootstrap|none>          a new node          -> node <i> <port> <id>
//       (<bootstrap>: 127.0.0.1:PORT[,127.0.0.1:PORT...])
//   announce <i> <hash40> <port>  announce_peer       -> announced <i> <hash> <port> <accepted>
//                                                       | announce-error <i> <hash> <message>
//   lookup <i> <hash40>           get_peers lookup    -> peer <i> <hash> <ip>:<port> (each new)
//                                                       then lookup-done <i> <hash> <nodes>
//                                                       | lookup-error <i> <hash> <message>
//   nodes                         routing tables      -> table <i> <port> <count> [<ip>:<port>:<id> ...]
//                                                       then nodes-done
//   ping <i> <ip>:<port>          ping, then add it   -> pong <i> <ip>:<port> <id>
//                                                       | ping-error <i> <ip>:<port> <message>
//   quit (or end of input)        destroy every node, exit 0
// Unsolicited: `warning <i> <message>` (bittorrent-dht/k-rpc warnings: a datagram it could not
// decode, an unexpected transaction id, ...), `stored <i> <hash> <ip>:<port>` (an announce_peer
// some other node made to node i), `error <message>` (a command that made no sense).
//
// Network rule: everything stays on loopback. Every node binds 127.0.0.1; bootstrap addresses
// must be 127.x.y.z literals (anything else is refused at start); bittorrent-dht's default
// bootstrap (the public routers) is never used, since every node gets an explicit list or
// `false`; and as a last guard each node's UDP socket drops any datagram addressed outside
// 127.0.0.0/8 (printed as `warning <i> dropped datagram to <addr>`).

import dgram from 'node:dgram'
import readline from 'node:readline'
import DHT from 'bittorrent-dht'

const nodes = []

function out (line) {
  process.stdout.write(line + '\n')
}

function isLoopback (host) {
  return typeof host === 'string' && /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host)
}

function parseAddr (s) {
  const m = /^(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}):(\d{1,5})$/.exec(s)
  if (!m || !isLoopback(m[1]) || Number(m[2]) < 1 || Number(m[2]) > 65535) {
    throw new Error(`not a 127.x.y.z:PORT address: ${s}`)
  }
  return { host: m[1], port: Number(m[2]) }
}

function parseBootstrap (s) {
  if (!s || s === 'none') return []
  return s.split(',').map(parseAddr)
}

function loopbackSocket (index) {
  const sock = dgram.createSocket('udp4')
  const send = sock.send.bind(sock)
  // Both forms of dgram's send: k-rpc-socket calls send(buf, offset, length, port, address,
  // cb), and dgram itself calls send(list, port, address, cb) again for a datagram queued
  // while the socket was still binding.
  sock.send = function (...args) {
    const long = args.length >= 5 && typeof args[1] === 'number' && typeof args[2] === 'number' &&
      typeof args[3] === 'number'
    const port = long ? args[3] : args[1]
    const address = long ? args[4] : args[2]
    if (!isLoopback(address)) {
      out(`warning ${index} dropped datagram to ${address}:${port}`)
      const cb = args[args.length - 1]
      if (typeof cb === 'function') process.nextTick(cb, null)
      return
    }
    return send(...args)
  }
  return sock
}

function hexOk (h) {
  return /^[0-9a-f]{40}$/.test(h)
}

function addNode (bootstrap) {
  return new Promise((resolve, reject) => {
    const index = nodes.length
    const dht = new DHT({
      // explicit: `false` for none, never undefined (which means the public routers)
      bootstrap: bootstrap.length ? bootstrap : false,
      socket: loopbackSocket(index)
    })
    nodes.push(dht)
    dht.on('warning', err => out(`warning ${index} ${String(err && err.message).replace(/\s+/g, ' ')}`))
    dht.on('error', err => {
      out(`warning ${index} error: ${String(err && err.message).replace(/\s+/g, ' ')}`)
      reject(err)
    })
    dht.on('announce', (peer, infoHash) => {
      out(`stored ${index} ${Buffer.from(infoHash).toString('hex')} ${peer.host}:${peer.port}`)
    })
    dht.listen(0, '127.0.0.1', () => {
      resolve({ index, dht })
    })
  })
}

function lookup (i, hash) {
  const dht = nodes[i]
  const seen = new Set()
  const onPeer = (peer, infoHash) => {
    if (Buffer.from(infoHash).toString('hex') !== hash) return
    const a = `${peer.host}:${peer.port}`
    if (seen.has(a)) return
    seen.add(a)
    out(`peer ${i} ${hash} ${a}`)
  }
  dht.on('peer', onPeer)
  dht.lookup(hash, (err, n) => {
    dht.removeListener('peer', onPeer)
    if (err) out(`lookup-error ${i} ${hash} ${String(err.message).replace(/\s+/g, ' ')}`)
    else out(`lookup-done ${i} ${hash} ${n}`)
  })
}

function announce (i, hash, port) {
  nodes[i].announce(hash, port, (err, n) => {
    if (err) out(`announce-error ${i} ${hash} ${String(err.message).replace(/\s+/g, ' ')}`)
    else out(`announced ${i} ${hash} ${port} ${n}`)
  })
}

function tables () {
  nodes.forEach((dht, i) => {
    const entries = dht.nodes.toArray().map(n =>
      `${n.host}:${n.port}:${Buffer.from(n.id).toString('hex')}`)
    out(`table ${i} ${dht.address().port} ${entries.length}${entries.length ? ' ' + entries.join(' ') : ''}`)
  })
  out('nodes-done')
}

function nodeIndex (s) {
  const i = Number(s)
  if (!Number.isInteger(i) || i < 0 || i >= nodes.length) throw new Error(`no node ${s}`)
  return i
}

let quitting = false
function quit () {
  if (quitting) return
  quitting = true
  let left = nodes.length
  if (!left) process.exit(0)
  for (const dht of nodes) {
    dht.destroy(() => {
      if (--left === 0) process.exit(0)
    })
  }
  setTimeout(() => process.exit(0), 2000).unref()
}

async function command (line) {
  const w = line.trim().split(/\s+/)
  if (!w[0]) return
  try {
    switch (w[0]) {
      case 'add': {
        const { index, dht } = await addNode(parseBootstrap(w[1]))
        out(`node ${index} ${dht.address().port} ${Buffer.from(dht.nodeId).toString('hex')}`)
        break
      }
      case 'announce': {
        const i = nodeIndex(w[1])
        const port = Number(w[3])
        if (!hexOk(w[2]) || !Number.isInteger(port) || port < 1 || port > 65535) {
          throw new Error('usage: announce <i> <hash40> <port>')
        }
        announce(i, w[2], port)
        break
      }
      case 'lookup': {
        const i = nodeIndex(w[1])
        if (!hexOk(w[2])) throw new Error('usage: lookup <i> <hash40>')
        lookup(i, w[2])
        break
      }
      case 'nodes':
        tables()
        break
      case 'ping': {
        // bittorrent-dht's own ping (what addNode() sends), then addNode() with the id
        const i = nodeIndex(w[1])
        const addr = parseAddr(w[2])
        nodes[i]._sendPing(addr, (err, node) => {
          if (err) {
            out(`ping-error ${i} ${w[2]} ${String(err.message).replace(/\s+/g, ' ')}`)
            return
          }
          nodes[i].addNode(node)
          out(`pong ${i} ${w[2]} ${Buffer.from(node.id).toString('hex')}`)
        })
        break
      }
      case 'quit':
        quit()
        break
      default:
        throw new Error(`unknown command ${w[0]}`)
    }
  } catch (e) {
    out(`error ${String(e.message).replace(/\s+/g, ' ')}`)
  }
}

async function main () {
  const args = process.argv.slice(2)
  let count = 1
  let boot = []
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--nodes') count = Number(args[++i])
    else if (args[i] === '--bootstrap') boot = parseBootstrap(args[++i])
    else throw new Error(`unknown argument ${args[i]}`)
  }
  if (!Number.isInteger(count) || count < 1 || count > 64) throw new Error('--nodes: 1..64')
  const first = await addNode(boot)
  const firstAddr = { host: '127.0.0.1', port: first.dht.address().port }
  for (let i = 1; i < count; i++) await addNode([firstAddr, ...boot])
  nodes.forEach((dht, i) =>
    out(`node ${i} ${dht.address().port} ${Buffer.from(dht.nodeId).toString('hex')}`))
  out(`ready ${nodes.map(d => d.address().port).join(' ')}`)

  const rl = readline.createInterface({ input: process.stdin })
  rl.on('line', line => { command(line) })
  rl.on('close', quit)
}

process.on('SIGTERM', quit)
main().catch(e => {
  out(`error ${String(e && e.message).replace(/\s+/g, ' ')}`)
  process.exit(2)
})
