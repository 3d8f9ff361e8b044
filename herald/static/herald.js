/**
 * herald.js: a dependency-free browser client for Herald.
 *
 * Submit a command (202 Accepted, `Location`, subscribe URLs, retried with the same
 * `Idempotency-Key`), then follow its operation, or subscribe to a topic such as a chat
 * room, over Server-Sent Events, WebSocket or polling. A stream falls back SSE → WebSocket
 * → polling when a transport fails or is blocked while the server still answers, comes
 * back by itself with its last cursor when the connection drops, and publishes its
 * connection state.
 *
 * ```js
 * import { Herald } from "/herald.js";
 * const herald = new Herald();
 * const op = await herald.submit("/orders", { item: "tea", qty: 2 });
 * for await (const event of herald.follow(op)) console.log(event.type, event.data);
 * ```
 *
 * @module herald
 */

/**
 * A connection state: `connecting` (first attempt), `live-sse`, `live-ws`, `polling`,
 * `reconnecting` (lost, trying again), `offline` (the browser says it is offline),
 * `closed` (ended: the operation finished or `close()` was called), `failed` (cannot go on).
 * @typedef {"connecting"|"live-sse"|"live-ws"|"polling"|"reconnecting"|"offline"|"closed"|"failed"} ConnectionState
 */

/**
 * A transport name, in fallback order.
 * @typedef {"sse"|"ws"|"poll"} Transport
 */

/**
 * A CloudEvents 1.0 envelope as Herald sends it.
 * @typedef {{specversion: string, id: string, source: string, type: string, time?: string,
 *   subject?: string, datacontenttype?: string, data?: any, correlationid?: string,
 *   causationid?: string}} HeraldEvent
 */

/**
 * An operation as the 202 (or `GET /operations/{id}?view=status`) describes it.
 * @typedef {{id: string, type?: string, status: string, operation_url: string,
 *   subscribe_url?: string, websocket_url?: string, result?: any, error?: any,
 *   location?: string}} Operation
 */

/**
 * What a `poll` function returns: events to deliver, optionally the cursor they reach,
 * whether the stream is finished, and how long to wait before polling again (ms).
 * @typedef {{events?: HeraldEvent[], cursor?: string|null, finished?: boolean, delay?: number}} PollResult
 */

/** @type {readonly Transport[]} */
export const TRANSPORTS = Object.freeze(["sse", "ws", "poll"]);

const LIVE = { sse: "live-sse", ws: "live-ws", poll: "polling" };
const STATUS_PREFIX = "herald.operation.";
const TERMINAL_STATUSES = new Set(["succeeded", "failed", "canceled"]);
const OPERATION_TYPES = ["running", "progress", "succeeded", "failed", "canceled"].map((s) => STATUS_PREFIX + s);
// WebSocket close codes that mean "come back at once with your cursor" (herald/protocol.py).
const WS_RECONNECT_NOW = new Set([4001, 4003, 4008]);
const WS_UNAUTHORIZED = 4401;
// The token that opened the stream expired (SSE `herald.disconnect` reason, WebSocket close code):
// come back at once with your cursor and the fresh URLs `refresh` gets.
const TOKEN_EXPIRED = "token-expired";
const WS_TOKEN_EXPIRED = 4003;

/** A value that can be read now and watched for changes. */
export class Observable {
  #value;
  #listeners = new Set();

  /** @param {any} value the initial value */
  constructor(value) {
    this.#value = value;
  }

  /** The current value. */
  get value() {
    return this.#value;
  }

  /**
   * Call `listener` with the current value now and with every later change.
   * @param {(value: any) => void} listener
   * @returns {() => void} a function that stops the calls
   */
  subscribe(listener) {
    this.#listeners.add(listener);
    listener(this.#value);
    return () => this.#listeners.delete(listener);
  }

  /** @param {any} value the new value; listeners are called only when it differs */
  set(value) {
    if (Object.is(value, this.#value)) return;
    this.#value = value;
    for (const listener of [...this.#listeners]) callSafely(listener, value);
  }
}

/** The server answered with an RFC 9457 problem; `title` is what to show a person. */
export class HeraldProblem extends Error {
  /**
   * @param {{type?: string, title?: string, status?: number, detail?: string}} problem
   * @param {number} status the HTTP status
   * @param {number|null} [retryAfter] seconds from `Retry-After`, when sent
   */
  constructor(problem, status, retryAfter = null) {
    super(problem.title || `HTTP ${status}`);
    this.name = "HeraldProblem";
    /** The whole problem document. */
    this.problem = problem;
    this.status = problem.status || status;
    this.title = problem.title || `HTTP ${status}`;
    this.detail = problem.detail || "";
    this.type = problem.type || "about:blank";
    this.retryAfter = retryAfter;
  }
}

/** The request did not reach Herald (network down, server gone) even after retries. */
export class HeraldNetworkError extends Error {
  /** @param {string} message @param {unknown} [cause] */
  constructor(message, cause) {
    super(message, { cause });
    this.name = "HeraldNetworkError";
    this.title = "Herald cannot be reached";
  }
}

/** A fresh random `Idempotency-Key` (works outside secure contexts too). */
export function newIdempotencyKey() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * A Herald client: one base URL, one transport policy, and the streams it opened.
 *
 * Options (all optional):
 * - `baseUrl`: where Herald is (default: this page's origin);
 * - `transport`: `"auto"` (SSE → WebSocket → polling) or one of `"sse"`, `"ws"`, `"poll"` to force it;
 * - `pollWait` (s): the long poll's `?wait=`; `pollInterval` (ms): pause between topic polls;
 * - `openTimeout` (ms): a transport that is not live by then counts as blocked;
 * - `backoffMin`/`backoffMax` (ms): reconnect delays (doubling, with jitter);
 * - `submitAttempts`: tries of one `submit` on network errors, 409 and 503;
 * - `pingInterval` (ms): WebSocket keep-alive pings, to notice a dead connection.
 */
export class Herald {
  /**
   * @param {{baseUrl?: string, transport?: "auto"|Transport, pollWait?: number, pollInterval?: number,
   *   openTimeout?: number, backoffMin?: number, backoffMax?: number, submitAttempts?: number,
   *   pingInterval?: number, fetch?: typeof fetch}} [options]
   */
  constructor(options = {}) {
    this.baseUrl = options.baseUrl || globalThis.location?.href || "http://localhost/";
    const forced = options.transport && options.transport !== "auto" ? options.transport : null;
    if (forced && !TRANSPORTS.includes(forced)) throw new TypeError(`unknown transport ${forced}`);
    /** @type {Transport[]} the transports streams try, in order */
    this.transports = forced ? [forced] : [...TRANSPORTS];
    this.pollWait = options.pollWait ?? 20;
    this.pollInterval = options.pollInterval ?? 2000;
    this.openTimeout = options.openTimeout ?? 8000;
    this.backoffMin = options.backoffMin ?? 500;
    this.backoffMax = options.backoffMax ?? 5000;
    this.submitAttempts = options.submitAttempts ?? 5;
    this.pingInterval = options.pingInterval ?? 25000;
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    /** @type {Observable} the state of the client's topic subscriptions taken together (see {@link ConnectionState}) */
    this.state = new Observable("closed");
    /** @type {Set<Stream>} */
    this.streams = new Set();
    /** @type {Set<Transport>} transports seen blocked (failing while Herald answered); new streams skip them */
    this.blocked = new Set();
  }

  /**
   * An absolute URL for a path or URL Herald handed out.
   * @param {string} path
   */
  url(path) {
    return new URL(path, this.baseUrl).href;
  }

  /**
   * Send a command: `POST path` with a JSON body. Resolves with the operation (202, or 200
   * when it already ended). Network errors, 409 (the same key is still being accepted) and
   * 503 are retried with the same `Idempotency-Key`, after `Retry-After` when the server
   * sends one, so a retry never creates a second operation.
   * @param {string} path e.g. `/orders`
   * @param {any} body the command, sent as JSON
   * @param {{idempotencyKey?: string, headers?: Record<string,string>, signal?: AbortSignal}} [options]
   * @returns {Promise<Operation>}
   * @throws {HeraldProblem} when Herald refuses the command (4xx, or 5xx after the retries)
   * @throws {HeraldNetworkError} when Herald cannot be reached after the retries
   */
  async submit(path, body, options = {}) {
    const key = options.idempotencyKey || newIdempotencyKey();
    const url = this.url(path);
    let lastError = null;
    for (let attempt = 0; attempt < this.submitAttempts; attempt++) {
      if (attempt > 0) await sleep(lastError?.retryAfter != null ? lastError.retryAfter * 1000 : this.backoff(attempt - 1), options.signal);
      let response;
      try {
        response = await this.fetch(url, {
          method: "POST",
          headers: { "Content-Type": "application/json", Accept: "application/json", "Idempotency-Key": key, ...options.headers },
          body: JSON.stringify(body),
          signal: options.signal,
        });
      } catch (error) {
        if (options.signal?.aborted) throw error;
        lastError = new HeraldNetworkError(`POST ${path} did not reach Herald`, error);
        continue;
      }
      if (response.ok) {
        const operation = await response.json();
        const location = response.headers.get("Location") || response.headers.get("Content-Location");
        operation.operation_url = this.url(operation.operation_url || location);
        operation.idempotency_key = key;
        return operation;
      }
      lastError = await problemOf(response);
      if (![409, 429, 503].includes(response.status)) break;
    }
    throw lastError;
  }

  /**
   * Follow an operation's events from its first to its terminal one
   * (`herald.operation.succeeded|failed|canceled`), after which the stream closes.
   * Use the callbacks, `stream.on(...)`, or iterate it: `for await (const event of follow(op))`.
   * When polling, the events are the status changes (`herald.operation.<status>`, data = the
   * status document).
   * @param {Operation|string} operation what `submit` returned, or an operation URL
   * @param {StreamOptions} [options]
   * @returns {Stream}
   */
  follow(operation, options = {}) {
    const op = typeof operation === "string" ? { operation_url: operation } : operation;
    const operationUrl = new URL(this.url(op.operation_url));
    const id = op.id || operationUrl.pathname.split("/").pop();
    const statusUrl = new URL(operationUrl);
    statusUrl.searchParams.set("view", "status");
    const refresh = async (signal) => {
      const response = await get(this, statusUrl.href, signal);
      const doc = await response.json();
      return { url: doc.subscribe_url, websocketUrl: doc.websocket_url };
    };
    return this.#open({
      ...options,
      topic: `operations/${id}`,
      url: op.subscribe_url,
      websocketUrl: op.websocket_url,
      types: [...OPERATION_TYPES, ...(options.types || [])],
      endOnTerminal: true,
      refresh, // also for URLs from the operation's body: their token expires, and the status view has fresh ones
      resolve: op.subscribe_url ? undefined : refresh,
      poll: options.poll || operationPoller(this, statusUrl),
      counted: false,
    });
  }

  /**
   * Subscribe to a topic (e.g. `orders/42`) with the URLs Herald handed out
   * for it. Without a `cursor` a domain topic starts live; with one it resumes right after it.
   * Polling needs a `poll` function (a topic has no generic poll endpoint; a resource's read
   * model, such as `GET /orders/42`, is what to poll).
   * @param {string} topic
   * @param {StreamOptions & {url?: string, websocketUrl?: string}} options
   * @returns {Stream}
   */
  subscribe(topic, options = {}) {
    return this.#open({ ...options, topic, endOnTerminal: false, counted: true });
  }

  /**
   * GET a JSON resource from Herald (e.g. `GET /orders/42`).
   * @param {string} path
   * @param {{signal?: AbortSignal}} [options]
   * @returns {Promise<any>}
   * @throws {HeraldProblem|HeraldNetworkError}
   */
  async getJSON(path, options = {}) {
    const response = await get(this, this.url(path), options.signal);
    return response.json();
  }

  /** Close every stream this client opened. */
  close() {
    for (const stream of [...this.streams]) stream.close();
  }

  /** @param {number} failures how many tries failed in a row @returns {number} ms to wait */
  backoff(failures) {
    const ceiling = Math.min(this.backoffMax, this.backoffMin * 2 ** Math.min(failures, 16));
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  #open(options) {
    const stream = new Stream(this, options);
    this.streams.add(stream);
    const off = stream.state.subscribe(() => this.#aggregate());
    stream.on("end", () => {
      off();
      this.streams.delete(stream);
      this.#aggregate();
    });
    stream.start();
    return stream;
  }

  #aggregate() {
    const states = [...this.streams].filter((s) => s.counted).map((s) => s.state.value);
    const first = (...names) => names.find((n) => states.includes(n));
    this.state.set(first("offline", "reconnecting", "connecting", "failed") || states[0] || "closed");
  }
}

/**
 * @typedef {object} StreamOptions
 * @property {string|null} [cursor] resume right after this cursor
 * @property {string[]} [types] event types to receive over SSE (EventSource delivers only named
 *   types it listens for); WebSocket and polling deliver every type anyway
 * @property {(signal: AbortSignal) => Promise<{url?: string, websocketUrl?: string}>} [refresh]
 *   fetch fresh subscribe URLs (a new token) before reconnecting, as when Herald ended the stream
 *   because its token expired (without it, that ends the stream); it also tells "the server
 *   answers" from "the server is gone" when deciding to fall back
 * @property {(ctx: {cursor: string|null, signal: AbortSignal}) => Promise<PollResult>} [poll]
 *   the polling transport: fetch what changed
 * @property {number} [pollInterval] ms between polls (default: the client's)
 * @property {(event: HeraldEvent, meta: {cursor: string|null, transport: Transport}) => void} [onEvent]
 * @property {(state: ConnectionState) => void} [onState]
 * @property {(gap: {topic: string, cursor: string|null, oldest: string|null, detail: string}) => void} [onGap]
 *   events after your cursor were no longer kept: reload what you show
 * @property {(error: Error) => void} [onError] the stream cannot go on (e.g. the operation is gone)
 */

/**
 * One followed topic: an operation or a domain topic, over whichever transport works.
 * Events: `event` (event, meta), `state` (state), `gap` (info), `error` (error), `end` (error|null).
 */
export class Stream {
  /** @param {Herald} client @param {any} options */
  constructor(client, options) {
    this.client = client;
    this.topic = options.topic;
    /** @type {string|null} the cursor of the last event delivered */
    this.cursor = options.cursor ?? null;
    /** @type {Observable} this stream's {@link ConnectionState} */
    this.state = new Observable("connecting");
    /** @type {Transport|null} the transport in use */
    this.transport = null;
    this.counted = options.counted;
    this.ended = false;
    this.error = null;
    this.options = options;
    this.urls = { url: options.url, websocketUrl: options.websocketUrl };
    this.transports = client.transports.filter((t) => this.#available(t));
    const unblocked = this.transports.findIndex((t) => !client.blocked.has(t));
    this.index = unblocked === -1 ? this.transports.length - 1 : unblocked;
    this.worked = new Set();
    this.listeners = new Map();
    this.teardown = null;
    this.wakeUp = null;
    this.result = undefined;
    /** @type {Promise<any>} resolves when the stream ends (with the terminal event's data for an operation); rejects on failure */
    this.done = new Promise((resolve, reject) => {
      this.on("end", (error) => (error ? reject(error) : resolve(this.result)));
    });
    this.done.catch(() => {});
    if (options.onEvent) this.on("event", options.onEvent);
    if (options.onGap) this.on("gap", options.onGap);
    if (options.onError) this.on("error", options.onError);
    if (options.onState) this.state.subscribe(options.onState);
    this.state.subscribe((s) => this.#emit("state", s));
  }

  /**
   * Listen for `event`, `state`, `gap`, `error` or `end`.
   * @param {"event"|"state"|"gap"|"error"|"end"} name
   * @param {(...args: any[]) => void} listener
   * @returns {() => void} a function that removes the listener
   */
  on(name, listener) {
    if (!this.listeners.has(name)) this.listeners.set(name, new Set());
    this.listeners.get(name).add(listener);
    return () => this.listeners.get(name)?.delete(listener);
  }

  /** Stop following; the state becomes `closed`. */
  close() {
    this.#end(null);
  }

  /** Iterate the events; ends with the stream, throws if it failed; `break` closes it. */
  [Symbol.asyncIterator]() {
    const queue = [];
    let wake = null;
    const offEvent = this.on("event", (event) => {
      queue.push(event);
      wake?.();
    });
    const offEnd = this.on("end", () => wake?.());
    const stop = () => {
      offEvent();
      offEnd();
    };
    return {
      next: async () => {
        for (;;) {
          if (queue.length) return { value: queue.shift(), done: false };
          if (this.ended) {
            stop();
            if (this.error) throw this.error;
            return { value: undefined, done: true };
          }
          await new Promise((resolve) => (wake = resolve));
          wake = null;
        }
      },
      return: async () => {
        stop();
        this.close();
        return { value: undefined, done: true };
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  /** @internal */
  start() {
    const onOnline = () => this.wakeUp?.();
    globalThis.addEventListener?.("online", onOnline);
    this.on("end", () => globalThis.removeEventListener?.("online", onOnline));
    this.#run().catch((error) => this.#end(error));
  }

  #available(transport) {
    if (transport === "sse") return typeof EventSource === "function";
    if (transport === "ws") return typeof WebSocket === "function";
    return typeof this.options.poll === "function";
  }

  #emit(name, ...args) {
    for (const listener of [...(this.listeners.get(name) || [])]) callSafely(listener, ...args);
  }

  #end(error) {
    if (this.ended) return;
    this.ended = true;
    this.error = error;
    this.teardown?.();
    this.wakeUp?.();
    this.state.set(error ? "failed" : "closed");
    if (error) this.#emit("error", error);
    this.#emit("end", error);
  }

  #live(transport) {
    this.transport = transport;
    this.worked.add(transport);
    this.client.blocked.delete(transport);
    this.state.set(LIVE[transport]);
  }

  /** Deliver one event unless it repeats one already delivered; true when it ends the stream. */
  #deliver(event, cursor) {
    if (this.ended || !event || typeof event !== "object") return false;
    if (cursor) {
      if (this.cursor && compareCursors(cursor, this.cursor) <= 0) return false;
      this.cursor = cursor;
    }
    this.#emit("event", event, { cursor, transport: this.transport });
    const status = typeof event.type === "string" && event.type.startsWith(STATUS_PREFIX) ? event.type.slice(STATUS_PREFIX.length) : null;
    if (this.options.endOnTerminal && TERMINAL_STATUSES.has(status)) {
      this.result = event.data;
      return true;
    }
    return false;
  }

  #gap(info) {
    this.#emit("gap", { topic: info.topic ?? this.topic, cursor: info.cursor ?? null, oldest: info.oldest ?? null, detail: info.detail || "" });
  }

  async #run() {
    if (!this.transports.length) throw new Error(`no transport available for ${this.topic}`);
    if (this.options.resolve) Object.assign(this.urls, await this.options.resolve());
    let failures = 0;
    while (!this.ended) {
      const transport = this.transports[this.index];
      this.transport = transport;
      const outcome = await this.#session(transport);
      if (this.ended) return;
      if (outcome.finished) return this.#end(null);
      if (outcome.reason === TOKEN_EXPIRED && !this.options.refresh) {
        // the same URLs would only be refused: without a way to fresh ones the stream cannot go on
        return this.#end(new Error(`the subscribe token of ${this.topic} expired and no refresh gets a fresh one`));
      }
      if (outcome.opened) failures = 0;
      this.state.set(navigator.onLine === false ? "offline" : this.worked.size ? "reconnecting" : "connecting");
      if (!(outcome.immediate && failures === 0)) {
        await this.#pause(outcome.retryAfter != null ? outcome.retryAfter * 1000 : this.client.backoff(failures));
      }
      failures++;
      if (this.ended) return;
      const reachable = await this.#refresh();
      if (this.ended) return;
      // A transport that never worked while the server answers is blocked here: try the next one.
      if (reachable && !this.worked.has(transport) && this.index < this.transports.length - 1) {
        this.client.blocked.add(transport);
        this.index++;
        failures = 0;
      }
    }
  }

  /** Wait `ms`, or less if the browser comes back online or the stream is closed. */
  #pause(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wakeUp = () => {
        this.wakeUp = null;
        done();
      };
    });
  }

  /** Fetch fresh URLs (or probe /healthz); whether Herald answered. Ends the stream when it is gone. */
  async #refresh() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), this.client.openTimeout);
    this.teardown = () => controller.abort();
    try {
      if (this.options.refresh) {
        Object.assign(this.urls, await this.options.refresh(controller.signal));
      } else {
        await get(this.client, this.client.url("/healthz"), controller.signal);
      }
      return true;
    } catch (error) {
      if (error instanceof HeraldProblem && [401, 403, 404, 410].includes(error.status)) this.#end(error);
      return error instanceof HeraldProblem && error.status < 500;
    } finally {
      clearTimeout(timer);
      this.teardown = null;
    }
  }

  /** Run one connection until it ends; resolves with what happened. */
  #session(transport) {
    if (transport === "sse") return this.#sse();
    if (transport === "ws") return this.#ws();
    return this.#poll();
  }

  /** One connection attempt: `finish` runs once, closes the connection and resolves with the outcome. */
  #attempt(resolve, close) {
    const attempt = {
      opened: false,
      settled: false,
      timer: null,
      pinger: null,
      finish: (outcome) => {
        if (attempt.settled) return;
        attempt.settled = true;
        clearTimeout(attempt.timer);
        clearInterval(attempt.pinger);
        close();
        this.teardown = null;
        resolve({ opened: attempt.opened, ...outcome });
      },
      /** Give up on this attempt unless it is live within `ms` (call with null once it is). */
      watch: (ms) => {
        clearTimeout(attempt.timer);
        if (ms != null) attempt.timer = setTimeout(() => attempt.finish({ reason: "timeout" }), ms);
      },
    };
    this.teardown = () => attempt.finish({ closed: true });
    attempt.watch(this.client.openTimeout);
    return attempt;
  }

  #sse() {
    return new Promise((resolve) => {
      const url = new URL(this.client.url(this.urls.url));
      if (this.cursor) url.searchParams.set("last_event_id", this.cursor);
      let source;
      try {
        source = new EventSource(url.href);
      } catch (error) {
        resolve({ opened: false, error });
        return;
      }
      const attempt = this.#attempt(resolve, () => source.close());
      source.onopen = () => {
        attempt.opened = true;
        attempt.watch(null);
        this.#live("sse");
      };
      source.onerror = () => {
        // Never opened, or refused (an HTTP error closes an EventSource for good): decide here.
        if (!attempt.opened || source.readyState === EventSource.CLOSED) return attempt.finish({ reason: "error" });
        // Dropped after it was live: the browser reconnects by itself, sending Last-Event-ID.
        this.state.set(navigator.onLine === false ? "offline" : "reconnecting");
        attempt.watch(this.client.openTimeout);
      };
      const onMessage = (message) => {
        let event;
        try {
          event = JSON.parse(message.data);
        } catch {
          return;
        }
        if (this.#deliver(event, message.lastEventId || null)) attempt.finish({ finished: true });
      };
      for (const type of new Set(["message", ...(this.options.types || [])])) source.addEventListener(type, onMessage);
      source.addEventListener("herald.gap", (message) => this.#gap(parseJSON(message.data)));
      source.addEventListener("herald.disconnect", (message) => {
        const info = parseJSON(message.data);
        if (info.cursor && !info.cursor.includes(",")) this.cursor = info.cursor;
        attempt.finish({ reason: info.reason === TOKEN_EXPIRED ? TOKEN_EXPIRED : "disconnect", immediate: info.reconnect !== false });
      });
    });
  }

  #ws() {
    return new Promise((resolve) => {
      const url = new URL(this.client.url(this.urls.websocketUrl || "/ws"));
      if (url.protocol === "http:" || url.protocol === "https:") url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      const token = url.searchParams.get("token");
      url.searchParams.delete("topic"); // subscribe by message instead, to send the cursor
      let socket;
      try {
        socket = new WebSocket(url.href);
      } catch (error) {
        resolve({ opened: false, error });
        return;
      }
      const attempt = this.#attempt(resolve, () => {
        if (socket.readyState <= WebSocket.OPEN) socket.close(1000);
      });
      const ref = `sub-${Math.random().toString(36).slice(2)}`;
      let awaitingPong = false;
      socket.onopen = () => {
        const frame = { type: "subscribe", topic: this.topic, id: ref };
        if (this.cursor) frame.cursor = this.cursor;
        if (token) frame.token = token;
        socket.send(JSON.stringify(frame));
      };
      socket.onmessage = (message) => {
        const frame = parseJSON(message.data);
        if (frame.type === "subscribed" && frame.topic === this.topic) {
          // the server names where a live subscription starts: resume from there, not live again
          if (!this.cursor && frame.cursor) this.cursor = frame.cursor;
          attempt.opened = true;
          attempt.watch(null);
          this.#live("ws");
          attempt.pinger = setInterval(() => {
            if (awaitingPong) return attempt.finish({ reason: "no-pong" });
            awaitingPong = true;
            socket.send(JSON.stringify({ type: "ping" }));
          }, this.client.pingInterval);
        } else if (frame.type === "event" && frame.topic === this.topic) {
          if (this.#deliver(frame.event, frame.cursor || null)) attempt.finish({ finished: true });
        } else if (frame.type === "gap" && frame.topic === this.topic) {
          this.#gap(frame);
        } else if (frame.type === "pong") {
          awaitingPong = false;
        } else if (frame.type === "error" && (frame.id === ref || frame.topic === this.topic)) {
          attempt.finish({ reason: frame.code || "error" });
        }
      };
      socket.onclose = (event) => attempt.finish({
        reason: event.code === WS_TOKEN_EXPIRED ? TOKEN_EXPIRED : `closed ${event.code}`,
        immediate: WS_RECONNECT_NOW.has(event.code) || event.code === WS_UNAUTHORIZED,
      });
    });
  }

  async #poll() {
    const controller = new AbortController();
    this.teardown = () => controller.abort();
    let opened = false;
    try {
      while (!this.ended) {
        const result = (await this.options.poll({ cursor: this.cursor, signal: controller.signal })) || {};
        if (!opened) {
          opened = true;
          this.#live("poll");
        }
        for (const event of result.events || []) {
          if (this.#deliver(event, null)) return { opened, finished: true };
        }
        if (result.cursor) this.cursor = result.cursor;
        if (result.finished) return { opened, finished: true };
        await sleep(result.delay ?? this.options.pollInterval ?? this.client.pollInterval, controller.signal);
      }
      return { opened, closed: true };
    } catch (error) {
      if (controller.signal.aborted) return { opened, closed: true };
      if (error instanceof HeraldProblem && [401, 403, 404, 410].includes(error.status)) {
        this.#end(error);
        return { opened, closed: true };
      }
      return { opened, reason: "poll-error", retryAfter: error.retryAfter ?? null };
    } finally {
      this.teardown = null;
    }
  }
}

/** The polling transport of an operation: long polls on `?view=status&wait=N` with its ETag. */
function operationPoller(client, statusUrl) {
  let etag = null;
  let seen = "pending";
  return async ({ signal }) => {
    const url = new URL(statusUrl);
    url.searchParams.set("wait", String(client.pollWait));
    const started = Date.now();
    const response = await get(client, url.href, signal, etag ? { "If-None-Match": etag } : {});
    const retryAfter = parseRetryAfter(response.headers.get("Retry-After")) ?? 1;
    // The server held the request for the long poll: ask again at once. Answered early without news: wait as told.
    const paced = Date.now() - started >= 1000;
    if (response.status === 304) return { delay: paced ? 0 : retryAfter * 1000 };
    etag = response.headers.get("ETag") || etag;
    const doc = await response.json();
    const events = [];
    if (doc.status !== seen) {
      seen = doc.status;
      events.push({
        specversion: "1.0",
        id: `${doc.id}.${doc.status}`,
        source: "herald.js/poll",
        type: STATUS_PREFIX + doc.status,
        time: doc.updated_at,
        subject: `operations/${doc.id}`,
        correlationid: doc.id,
        datacontenttype: "application/json",
        data: { id: doc.id, status: doc.status, result: doc.result ?? null, error: doc.error ?? null, location: doc.location ?? null },
      });
      return { events, delay: 0 };
    }
    return { events, delay: paced ? 0 : retryAfter * 1000 };
  };
}

/** GET a URL: the Response (2xx or 304), else throws {@link HeraldProblem} or {@link HeraldNetworkError}. */
async function get(client, url, signal, headers = {}) {
  let response;
  try {
    response = await client.fetch(url, { headers: { Accept: "application/json", ...headers }, signal, cache: "no-store" });
  } catch (error) {
    if (signal?.aborted) throw error;
    throw new HeraldNetworkError(`GET ${url} did not reach Herald`, error);
  }
  if (!response.ok && response.status !== 304) throw await problemOf(response);
  return response;
}

/** @param {Response} response @returns {Promise<HeraldProblem>} */
async function problemOf(response) {
  let problem = null;
  if ((response.headers.get("Content-Type") || "").includes("json")) {
    try {
      problem = await response.json();
    } catch {
      problem = null;
    }
  }
  if (!problem || typeof problem !== "object") problem = { title: response.statusText || `HTTP ${response.status}`, status: response.status };
  return new HeraldProblem(problem, response.status, parseRetryAfter(response.headers.get("Retry-After")));
}

/** `Retry-After` in seconds (delta-seconds or an HTTP date), or null. */
export function parseRetryAfter(value) {
  if (value == null || value === "") return null;
  if (/^\d+$/.test(value.trim())) return Number(value);
  const at = Date.parse(value);
  return Number.isNaN(at) ? null : Math.max(0, (at - Date.now()) / 1000);
}

/**
 * Order two `"<ms>-<seq>.<epoch>"` cursors (-1, 0, 1). A cursor of another epoch (the topic's history
 * started again) or of another shape compares as newer; one without an epoch is ordered by position.
 */
export function compareCursors(a, b) {
  const pa = /^(\d+)-(\d+)(?:\.([0-9a-z]+))?$/.exec(a);
  const pb = /^(\d+)-(\d+)(?:\.([0-9a-z]+))?$/.exec(b);
  if (!pa || !pb || (pa[3] && pb[3] && pa[3] !== pb[3])) return 1;
  return Math.sign(Number(pa[1]) - Number(pb[1])) || Math.sign(Number(pa[2]) - Number(pb[2]));
}

function parseJSON(text) {
  try {
    const value = JSON.parse(text);
    return value && typeof value === "object" ? value : {};
  } catch {
    return {};
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}

function callSafely(fn, ...args) {
  try {
    fn(...args);
  } catch (error) {
    setTimeout(() => {
      throw error;
    });
  }
}

let defaultClient = null;

/** The client the module-level functions use (created on first use, on this page's origin). */
export function herald() {
  return (defaultClient ??= new Herald());
}

/** {@link Herald#submit} on the default client. */
export const submit = (path, body, options) => herald().submit(path, body, options);
/** {@link Herald#follow} on the default client. */
export const follow = (operation, options) => herald().follow(operation, options);
/** {@link Herald#subscribe} on the default client. */
export const subscribe = (topic, options) => herald().subscribe(topic, options);
