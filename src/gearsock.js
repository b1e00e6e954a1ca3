// gearsock.js: the browser client of gearsock's WebSocket protocol (docs/PROTOCOL.md, "The
// browser client: /gearsock.js"). No dependency, no build step. The server serves this file
// as /gearsock.js (a classic script: it defines the global `Gearsock`) and as /gearsock.mjs
// (the same text with `export` lines appended: `import Gearsock from "/gearsock.mjs"`).
//
// What it does for a page: one WebSocket that comes back by itself (exponential back-off with
// jitter, capped), the `auth` message sent first on every connection, and jobs that outlive a
// connection: each unfinished job is re-attached with the last `seq` the page saw, so every
// job event reaches the application once, in order, or a `gap` says which ones the server
// could not keep.
var Gearsock = (function () {
  "use strict";

  // The replies about a job, and the event name the job object emits for each.
  const JOB_EVENTS = {
    "job.created": "created",
    "job.data": "data",
    "job.status": "status",
    "job.warning": "warning",
    "job.complete": "complete",
    "job.failed": "failed",
    "job.exception": "exception",
    "job.lost": "lost",
  };
  // The replies after which the server says nothing more about a job.
  const FINAL = { complete: true, failed: true, exception: true, lost: true };
  // How long an attach may go unanswered before it is asked again (a relayed attach crosses
  // gearmand twice), and how many times it is asked before the job is given up.
  const ATTACH_ANSWER_MS = 10000;
  const ATTACH_TRIES = 6;

  /** An outcome that is not a result: `code` is `failed`, `exception`, `lost`, `detached`,
   *  a server error code (`forbidden`, `unauthorized`, …) or `queue_full`; `event` is the
   *  message that ended the job. */
  class GearsockError extends Error {
    constructor(code, message, event) {
      super(message);
      this.name = "GearsockError";
      this.code = code;
      this.event = event || null;
    }
  }

  // A few lines of event emitter: a handler that throws is reported (asynchronously) and
  // never breaks the client's own bookkeeping.
  class Emitter {
    constructor() {
      this._handlers = new Map();
    }
    /** Calls `fn(event)` for every `name` event; returns a function that unsubscribes. */
    on(name, fn) {
      if (!this._handlers.has(name)) this._handlers.set(name, new Set());
      this._handlers.get(name).add(fn);
      return () => this.off(name, fn);
    }
    /** Like `on`, for the next `name` event only. */
    once(name, fn) {
      const off = this.on(name, (ev) => {
        off();
        fn(ev);
      });
      return off;
    }
    /** Removes a handler `on` added. */
    off(name, fn) {
      const set = this._handlers.get(name);
      if (set) set.delete(fn);
    }
    _emit(name, ev) {
      const set = this._handlers.get(name);
      if (!set) return;
      for (const fn of Array.from(set)) {
        try {
          fn(ev);
        } catch (e) {
          setTimeout(() => {
            throw e;
          });
        }
      }
    }
  }

  /** One submitted job. Its events: `created`, `data`, `status`, `warning`, `complete`,
   *  `failed`, `exception`, `lost`, `error`, `gap`, `attached`, `detached`, then `end` (once,
   *  with `{outcome, event}`); `event` gets every one of them. */
  class Job extends Emitter {
    constructor(client, ref, fields) {
      super();
      this._client = client;
      /** The `ref` this client gave the job (a number). */
      this.ref = ref;
      /** The function it runs. */
      this.function = fields.function;
      /** `stream` or `background`. */
      this.mode = fields.mode || "stream";
      /** gearmand's handle, once `created`. */
      this.handle = null;
      /** `queued` (not sent yet), `sent`, `created`, `running`, then the outcome: `complete`,
       *  `failed`, `exception`, `lost`, `error` or `detached`. */
      this.state = "queued";
      /** The highest `seq` delivered; an event at or below it is a repeat and is dropped. */
      this.seq = 0;
      /** How many times the job was re-attached after a lost connection. */
      this.reattached = 0;
      /** Whether an `attach` is on its way and not answered yet. */
      this.attaching = false;
      /** True once the job ended (`end` was emitted). */
      this.finished = false;
      /** The result, once `complete`. */
      this.result = undefined;
      this._resume = null;
      this._sinks = new Set();
      /** Resolves with the result (a string, a `Uint8Array` for a result that is not UTF-8,
       *  or `null` when none was reported); rejects with a `GearsockError` otherwise. */
      this.done = new Promise((resolve, reject) => {
        this._resolve = resolve;
        this._reject = reject;
      });
      // An application that only listens to events must not see "unhandled rejection".
      this.done.catch(() => {});
    }

    /** Asks the server for the job's status once (the answer is a `status` event). */
    askStatus() {
      if (this.finished || this.handle === null) return false;
      return this._client.send({ type: "status", job: this.handle, ref: this.ref });
    }

    /** The job's replies as they come (`for await (const ev of job)`), each a message object
     *  (`ev.type` is `job.data`, `job.gap`, …), ending after the last one. It sees the events
     *  that arrive after it was made, so make it right after `submit`. */
    [Symbol.asyncIterator]() {
      const buffer = [];
      let wake = null;
      let over = this.finished;
      const sink = (ev, last) => {
        if (ev) buffer.push(ev);
        if (last) over = true;
        if (wake) {
          const w = wake;
          wake = null;
          w();
        }
      };
      this._sinks.add(sink);
      const next = () => {
        if (buffer.length) return Promise.resolve({ value: buffer.shift(), done: false });
        if (over) {
          this._sinks.delete(sink);
          return Promise.resolve({ value: undefined, done: true });
        }
        return new Promise((r) => {
          wake = r;
        }).then(next);
      };
      return {
        next,
        return: () => {
          over = true;
          buffer.length = 0;
          this._sinks.delete(sink);
          return Promise.resolve({ value: undefined, done: true });
        },
        [Symbol.asyncIterator]() {
          return this;
        },
      };
    }

    // Hands one event to the handlers of `name`, the `event` handlers and the iterators.
    _deliver(name, msg) {
      this._emit(name, msg);
      this._emit("event", msg);
      for (const sink of this._sinks) sink(msg, false);
    }

    // Ends the job: `outcome` is `complete` or an error code.
    _finish(outcome, msg) {
      if (this.finished) return;
      this.finished = true;
      this.attaching = false;
      this.state = outcome;
      this._client._forget(this);
      const name = FINAL[outcome] || outcome === "detached" ? outcome : "error";
      this._deliver(name, msg);
      if (outcome === "complete") {
        this.result = resultOf(msg);
        this._resolve(this.result);
      } else {
        const why = msg.reason || msg.message || msg.data || outcome;
        this._reject(new GearsockError(outcome === "error" ? msg.code || "error" : outcome, String(why), msg));
      }
      this._emit("end", { outcome, event: msg });
      for (const sink of this._sinks) sink(null, true);
    }
  }

  // The result of a `job.complete`: its text, its bytes when they are not UTF-8, or null.
  function resultOf(msg) {
    if (typeof msg.result === "string") return msg.result;
    if (typeof msg.result_b64 === "string") return Gearsock.bytes(msg.result_b64);
    return msg.result === undefined ? null : msg.result;
  }

  // The page's own server, as a WebSocket URL.
  function defaultUrl() {
    if (typeof location === "undefined") throw new Error("Gearsock: no page to take a URL from; pass { url }");
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host;
  }

  /** A connection to a gearsock server that reconnects by itself. Events: `state` (`{state,
   *  attempt, retryAt, delayMs}`), `open` (`{reconnected}`), `close` (`{code, reason}`),
   *  `auth` (the `auth.ok` message), `error` (an `error` about no job), `text` (a plain-text
   *  reply: the article's ping), `message` (any other message about no job of this client). */
  class Client extends Emitter {
    constructor(options) {
      super();
      const o = options || {};
      this.url = o.url || defaultUrl();
      this._token = o.token === undefined ? null : o.token;
      const r = o.reconnect === false ? null : o.reconnect || {};
      this._backoff = r && {
        min: r.minDelayMs === undefined ? 250 : r.minDelayMs,
        max: r.maxDelayMs === undefined ? 10000 : r.maxDelayMs,
        stable: r.stableMs === undefined ? 5000 : r.stableMs,
      };
      this._queueLimit = o.queueLimit === undefined ? 100 : o.queueLimit;
      this._WebSocket = o.WebSocket || (typeof WebSocket !== "undefined" ? WebSocket : null);
      if (!this._WebSocket) throw new Error("Gearsock: no WebSocket here; pass { WebSocket }");
      /** `idle`, `connecting`, `open`, `reconnecting` (waiting for `retryAt`) or `closed`. */
      this.state = "idle";
      /** Failed attempts since the last connection that lasted (drives the back-off). */
      this.attempt = 0;
      /** When the next attempt starts (ms since the epoch), while `reconnecting`. */
      this.retryAt = null;
      this._ws = null;
      this._ready = false;
      this._openedAt = 0;
      this._everOpen = false;
      this._timer = null;
      this._queue = [];
      this._nextRef = 1;
      this._jobs = new Map(); // ref -> Job, unfinished only
      this._byHandle = new Map(); // handle -> Job, unfinished only
      if (typeof window !== "undefined" && window.addEventListener) {
        this._online = () => this.reconnectNow();
        window.addEventListener("online", this._online);
      }
      // A moment later, so that handlers added right after `new` see the first `connecting`.
      if (o.connect !== false) Promise.resolve().then(() => this.state === "idle" && this.connect());
    }

    /** Opens the connection (done right after the constructor unless `connect: false`). */
    connect() {
      if (this.state === "connecting" || this.state === "open") return;
      clearTimeout(this._timer);
      this._timer = null;
      this.retryAt = null;
      this._setState("connecting");
      let ws;
      try {
        ws = new this._WebSocket(this.url);
      } catch (e) {
        this._lost(null, 1006, String(e && e.message));
        return;
      }
      this._ws = ws;
      let opened = false;
      ws.onopen = () => {
        if (ws !== this._ws) return;
        opened = true;
        this._openedAt = Date.now();
        this._greet(ws);
      };
      ws.onmessage = (e) => {
        if (ws === this._ws) this._onMessage(e.data);
      };
      ws.onclose = (e) => {
        if (ws !== this._ws) return;
        if (opened && Date.now() - this._openedAt >= (this._backoff ? this._backoff.stable : 0)) this.attempt = 0;
        this._lost(ws, e.code, e.reason, opened);
      };
      ws.onerror = () => {}; // a close event always follows
    }

    /** While waiting to reconnect: try now (the back-off goes on from where it was). */
    reconnectNow() {
      if (this.state === "reconnecting") this.connect();
    }

    /** Closes for good: unfinished jobs end as `lost` on this side (the server keeps them for
     *  its grace period), queued messages are dropped. */
    close() {
      clearTimeout(this._timer);
      this._timer = null;
      this.retryAt = null;
      const ws = this._ws;
      this._ws = null;
      this._ready = false;
      if (ws) ws.close(1000);
      this._queue.length = 0;
      this._setState("closed");
      this._endAll("the application closed the connection");
      if (this._online) window.removeEventListener("online", this._online);
    }

    /** Runs a job: `{function, payload | payload_b64, mode, priority, unique}`; returns its
     *  `Job`. While disconnected the submit waits in the queue. */
    submit(fields) {
      if (!fields || typeof fields.function !== "string") throw new TypeError("submit needs { function }");
      const ref = this._nextRef++;
      const job = new Job(this, ref, fields);
      const msg = { type: "submit", function: fields.function, ref };
      for (const k of ["payload", "payload_b64", "mode", "priority", "unique"]) {
        if (fields[k] !== undefined && fields[k] !== null) msg[k] = fields[k];
      }
      this._jobs.set(ref, job);
      msg._job = job;
      if (!this._sendOrQueue(msg)) {
        const ev = { type: "error", code: "queue_full", ref, message: "disconnected, and the send queue is full" };
        // Later, so that handlers added right after `submit` hear it.
        Promise.resolve().then(() => job._finish("error", ev));
      }
      return job;
    }

    /** Sends the article's `{"type":"ping"}`; its plain-text replies come as `text` events. */
    ping() {
      return this.send({ type: "ping" });
    }

    /** Sends `{"type":"auth"}` now with the current token (a refresh); later connections
     *  send it by themselves. `token` replaces the option when given. */
    auth(token) {
      if (token !== undefined) this._token = token;
      if (!this._ready) return Promise.resolve(false);
      return this._tokenNow().then((t) => (t ? this._write({ type: "auth", token: t }) : false));
    }

    /** Sends any message object: at once when connected, else queued (bounded). False when
     *  the queue is full. */
    send(msg) {
      return this._sendOrQueue(Object.assign({}, msg));
    }

    /** The unfinished jobs. */
    jobs() {
      return Array.from(this._jobs.values());
    }

    _setState(state, extra) {
      this.state = state;
      this._emit("state", Object.assign({ state, attempt: this.attempt, retryAt: this.retryAt }, extra || {}));
    }

    _tokenNow() {
      const t = typeof this._token === "function" ? this._token() : this._token;
      return Promise.resolve(t).then((v) => (typeof v === "string" && v ? v : null));
    }

    // A new connection is open: the token first, then the re-attaches, then the queue, all
    // before anything newer (the server reads a connection's messages in order).
    _greet(ws) {
      this._tokenNow()
        .catch(() => null)
        .then((token) => {
          if (ws !== this._ws) return;
          this._ready = true;
          if (token) this._write({ type: "auth", token });
          for (const job of this._jobs.values()) {
            if (job.handle === null || job.finished || job._resume === null) continue;
            this._attach(job);
          }
          const queued = this._queue.splice(0);
          for (const msg of queued) this._write(msg);
          const reconnected = this._everOpen;
          this._everOpen = true;
          this._setState("open");
          this._emit("open", { reconnected });
        });
    }

    // The `attach` that takes `job` back on this connection. An attach that lands on another
    // process or instance is relayed to the job's owner through gearmand; if no answer comes
    // within ATTACH_ANSWER_MS, it is asked again (with back-off), at most ATTACH_TRIES times.
    _attach(job) {
      job.attaching = true;
      this._write({ type: "attach", job: job.handle, resume: job._resume, after: job.seq, ref: job.ref });
      const ws = this._ws;
      const sent = (job._attachSent = (job._attachSent || 0) + 1);
      setTimeout(() => {
        if (ws === this._ws && job.attaching && !job.finished && job._attachSent === sent) this._retryAttach(job);
      }, ATTACH_ANSWER_MS);
    }

    // The attach failed for now (no gearmand to relay it through, the relay broke, or no
    // answer): ask again after an exponential back-off with jitter, or give the job up.
    _retryAttach(job) {
      job.attaching = true;
      job._attachTries = (job._attachTries || 0) + 1;
      if (job._attachTries > ATTACH_TRIES) {
        const reason = "could not re-attach: no answer after " + ATTACH_TRIES + " tries";
        job._finish("lost", { type: "job.lost", job: job.handle, ref: job.ref, local: true, reason });
        return;
      }
      const cap = Math.min(10000, 250 * Math.pow(2, job._attachTries - 1));
      this._reattachLater(job, Math.round(cap / 2 + (Math.random() * cap) / 2));
    }

    // The attach again after `ms`, if this connection is still the one (a new connection
    // re-attaches by itself).
    _reattachLater(job, ms) {
      const ws = this._ws;
      setTimeout(() => {
        if (ws === this._ws && this._ready && job.attaching && !job.finished) this._attach(job);
      }, ms);
    }

    _sendOrQueue(msg) {
      if (this._ready) return this._write(msg);
      if (this.state === "closed" || this._queue.length >= this._queueLimit) return false;
      this._queue.push(msg);
      return true;
    }

    _write(msg) {
      const job = msg._job;
      let text;
      if (job) {
        delete msg._job;
        text = JSON.stringify(msg);
        msg._job = job;
        if (job.finished) return false;
        job.state = "sent";
      } else {
        text = JSON.stringify(msg);
      }
      this._ws.send(text);
      return true;
    }

    // The connection ended (or never opened): settle what cannot survive it, then wait.
    _lost(ws, code, reason, opened) {
      this._ws = null;
      this._ready = false;
      if (opened) this._emit("close", { code, reason });
      for (const job of Array.from(this._jobs.values())) {
        if (job.state === "sent") {
          // Sent, but the server never named it: nothing to re-attach to.
          const ev = { type: "job.lost", job: null, ref: job.ref, local: true,
            reason: "the connection closed before the server named this job; it may or may not run" };
          job._finish("lost", ev);
        } else if (job.handle !== null && job._resume === null) {
          // A server without resumable jobs (no `resume` in `job.created`) ended it with us.
          const ev = { type: "job.lost", job: job.handle, ref: job.ref, local: true,
            reason: "the connection closed, and this server does not keep jobs across connections" };
          job._finish("lost", ev);
        } else {
          job.attaching = false;
        }
      }
      if (!this._backoff) {
        this._setState("closed", { code, reason });
        this._endAll("the connection closed (code " + code + ")");
        return;
      }
      const b = this._backoff;
      const cap = Math.min(b.max, b.min * Math.pow(2, this.attempt));
      const delayMs = Math.round(cap / 2 + (Math.random() * cap) / 2);
      this.attempt += 1;
      this.retryAt = Date.now() + delayMs;
      this._timer = setTimeout(() => this.connect(), delayMs);
      this._setState("reconnecting", { delayMs, code, reason });
    }

    _endAll(reason) {
      for (const job of Array.from(this._jobs.values())) {
        job._finish("lost", { type: "job.lost", job: job.handle, ref: job.ref, local: true, reason });
      }
    }

    _forget(job) {
      this._jobs.delete(job.ref);
      if (job.handle !== null && this._byHandle.get(job.handle) === job) this._byHandle.delete(job.handle);
    }

    _onMessage(data) {
      let msg = null;
      if (typeof data === "string") {
        try {
          msg = JSON.parse(data);
        } catch (e) {
          msg = null;
        }
      }
      if (!msg || typeof msg !== "object" || typeof msg.type !== "string") {
        this._emit("text", typeof data === "string" ? data : data);
        return;
      }
      const job = this._jobOf(msg);
      if (!job) {
        if (msg.type === "auth.ok") this._emit("auth", msg);
        else if (msg.type === "error") this._emit("error", msg);
        else this._emit("message", msg);
        return;
      }
      this._onJobMessage(job, msg);
    }

    _jobOf(msg) {
      if (msg.ref !== undefined && msg.ref !== null && this._jobs.has(msg.ref)) return this._jobs.get(msg.ref);
      if (typeof msg.job === "string" && this._byHandle.has(msg.job)) return this._byHandle.get(msg.job);
      return null;
    }

    _onJobMessage(job, msg) {
      switch (msg.type) {
        case "job.attached":
          job.attaching = false;
          job._attachTries = 0;
          job.reattached += 1;
          job._deliver("attached", msg);
          return;
        case "job.gap":
          if (typeof msg.to === "number" && msg.to > job.seq) job.seq = msg.to;
          job._deliver("gap", msg);
          return;
        case "job.detached":
          job._finish("detached", Object.assign({ reason: "another connection attached this job" }, msg));
          return;
        case "error":
          if (job.attaching && msg.code === "rate_limited") {
            // An attach draws from the job rate like a submit: ask again when told.
            this._reattachLater(job, Number(msg.retry_after_ms) || 500);
          } else if (msg.code === "unavailable" && (job.attaching || msg.job === job.handle)) {
            // No gearmand to relay the attach through, or the relay to the job's owner broke:
            // the job may well live on, so attach again later.
            this._retryAttach(job);
          } else if (job.attaching) {
            // The server no longer has the job (expired, restarted) or will not attach it.
            const reason = "could not re-attach (" + msg.code + ": " + (msg.message || "") + ")";
            job._finish("lost", { type: "job.lost", job: job.handle, ref: job.ref, local: true, reason, error: msg });
          } else if (job.handle === null) {
            job._finish("error", msg);
          } else {
            job._deliver("error", msg); // an answer to askStatus: the job goes on
          }
          return;
      }
      const name = JOB_EVENTS[msg.type];
      if (!name) {
        job._deliver("event", msg);
        return;
      }
      if (typeof msg.seq === "number") {
        if (msg.seq <= job.seq) return; // seen on an earlier connection
        job.seq = msg.seq;
      }
      if (typeof msg.job === "string" && job.handle === null) {
        job.handle = msg.job;
        this._byHandle.set(msg.job, job);
      }
      if (name === "created") {
        if (typeof msg.resume === "string") job._resume = msg.resume;
        job.state = "created";
      } else if (!FINAL[name] && (name === "data" || (name === "status" && msg.running))) {
        job.state = "running";
      }
      if (FINAL[name]) job._finish(name, msg);
      else job._deliver(name, msg);
    }
  }

  /** Decodes base64 (a `data_b64`, `result_b64`) to bytes. */
  function bytes(b64) {
    const bin = atob(b64);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  /** `new Gearsock(options)` is a `Client`. */
  const Gearsock = Client;
  Gearsock.Client = Client;
  Gearsock.Job = Job;
  Gearsock.GearsockError = GearsockError;
  Gearsock.bytes = bytes;
  return Gearsock;
})();
