// The chat page: Herald's browser client at work. Own messages show their operation live
// (sending → delivered → read by whom); others' messages arrive on the room's topic and are
// acknowledged with a read receipt once they are on screen.
import { Herald, HeraldProblem, newIdempotencyKey } from "/herald.js";

const MAX_TEXT = 2000;
const ROOM_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
const ROOM_EVENTS = ["ChatMessageDelivered", "ChatMessageRead"];
const STATE_LABELS = {
  connecting: "Connecting…",
  "live-sse": "Live via SSE",
  "live-ws": "Live via WebSocket",
  polling: "Live via polling",
  reconnecting: "Reconnecting…",
  offline: "Offline",
  closed: "Not connected",
  failed: "Disconnected",
};
const STATUS_LABELS = { sending: "Sending…", sent: "Sent", delivered: "Delivered" };

const params = new URLSearchParams(location.search);
const forced = params.get("transport");
const herald = new Herald({ transport: ["sse", "ws", "poll"].includes(forced) ? forced : "auto", pollInterval: 1000 });

const $ = (id) => document.getElementById(id);
const list = $("messages");
const textarea = $("text");

let me = "";
let room = "";
let localSeq = 0;
/** key (the message id, or "local-N" until the server names it) → entry */
const entries = new Map();
/** operation id → entry key: joins a send's operation to the message it created */
const keyByOperation = new Map();
const readSent = new Set();
const onScreen = new Set();
const seenObserver = new IntersectionObserver(onIntersect, { root: list, threshold: 0.6 });

// Errors ------------------------------------------------------------------------------

function showError(error) {
  const box = $("error");
  box.querySelector(".title").textContent = error.title || error.message || "Something went wrong";
  box.querySelector(".detail").textContent = error.detail || "";
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

function showNotice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

// Messages ----------------------------------------------------------------------------

function render(entry) {
  let node = entry.node;
  if (!node) {
    node = entry.node = document.createElement("li");
    node.innerHTML = '<p class="meta"><span class="author"></span> <time></time></p><p class="text"></p>';
    const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    list.append(node);
    if (nearBottom || entry.own) node.scrollIntoView({ block: "end" });
    if (!entry.own) seenObserver.observe(node);
  }
  node.className = entry.own ? "message own" : "message";
  node.dataset.key = entry.key;
  if (entry.id) node.dataset.id = entry.id;
  node.dataset.author = entry.author;
  node.querySelector(".author").textContent = entry.own ? `${entry.author} (you)` : entry.author;
  const time = node.querySelector("time");
  time.dateTime = entry.sentAt;
  time.textContent = new Date(entry.sentAt).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  node.querySelector(".text").textContent = entry.text;
  if (entry.own) renderStatus(entry, node);
}

function renderStatus(entry, node) {
  let status = node.querySelector(".status");
  if (!status) {
    status = document.createElement("p");
    status.className = "status";
    node.append(status);
  }
  const readers = [...entry.readBy];
  const state = entry.status === "delivered" && readers.length ? "read" : entry.status;
  status.dataset.status = state;
  status.textContent =
    state === "read" ? `Read by ${readers.join(", ")}`
    : state === "failed" ? `Not sent: ${entry.error}`
    : STATUS_LABELS[state];
  if (state === "failed" && entry.retry) {
    const retry = document.createElement("button");
    retry.type = "button";
    retry.textContent = "Retry";
    retry.addEventListener("click", entry.retry);
    status.append(" ", retry);
  }
}

/** Add or update a message the server sent (history, room topic, operation result, poll). */
function upsertMessage(message) {
  if (!message || typeof message.id !== "string") return;
  let entry = entries.get(message.id);
  const localKey = (message.operation_id && keyByOperation.get(message.operation_id)) || pendingKeyFor(message);
  if (!entry && localKey && entries.has(localKey)) {
    entry = entries.get(localKey);
    entries.delete(localKey);
    entry.key = message.id;
    entries.set(message.id, entry);
  }
  if (message.operation_id) keyByOperation.set(message.operation_id, message.id);
  if (!entry) {
    entry = { key: message.id, own: message.author === me, author: message.author, text: message.text,
              sentAt: message.sent_at, readBy: new Set(), status: "delivered", node: null };
    entries.set(message.id, entry);
  }
  const before = `${entry.id}|${entry.status}|${entry.readBy.size}`;
  entry.id = message.id;
  if (entry.status !== "failed") entry.status = "delivered";
  for (const reader of message.read_by || []) entry.readBy.add(reader);
  if (!entry.node || before !== `${entry.id}|${entry.status}|${entry.readBy.size}`) render(entry);
  markSeen();
}

/**
 * The own message still waiting for its 202 that `message` is, if any: when the answer to a
 * POST is lost and retried, the room can announce the message before the page learns its
 * operation id.
 */
function pendingKeyFor(message) {
  if (message.author !== me) return undefined;
  for (const entry of entries.values()) {
    if (entry.own && !entry.id && entry.status === "sending" && entry.text === message.text) return entry.key;
  }
  return undefined;
}

function recordRead(receipt) {
  const entry = entries.get(receipt?.message_id);
  if (!entry || entry.readBy.has(receipt.reader)) return;
  entry.readBy.add(receipt.reader);
  render(entry);
}

function onRoomEvent(event) {
  if (event.type === "ChatMessageDelivered") upsertMessage(event.data);
  else if (event.type === "ChatMessageRead") recordRead(event.data);
}

// Sending -----------------------------------------------------------------------------

async function send(text) {
  const entry = { key: `local-${++localSeq}`, own: true, author: me, text, sentAt: new Date().toISOString(),
                  readBy: new Set(), status: "sending", node: null };
  entries.set(entry.key, entry);
  const idempotencyKey = newIdempotencyKey();
  entry.retry = () => submitMessage(entry, idempotencyKey);
  render(entry);
  await submitMessage(entry, idempotencyKey);
}

async function submitMessage(entry, idempotencyKey) {
  entry.status = "sending";
  render(entry);
  let operation;
  try {
    operation = await herald.submit(`/chats/${room}/messages`, { author: me, text: entry.text }, { idempotencyKey });
  } catch (error) {
    showError(error);
    if (error instanceof HeraldProblem && error.status < 500) {
      // Refused for good (e.g. 422 "Message too long"): give the text back to edit.
      entries.delete(entry.key);
      entry.node?.remove();
      if (!textarea.value) textarea.value = entry.text;
      updateCount();
      textarea.focus();
    } else {
      entry.status = "failed";
      entry.error = error.title || "Herald cannot be reached";
      render(entry);
    }
    return;
  }
  const deliveredKey = keyByOperation.get(operation.id);
  if (deliveredKey && deliveredKey !== entry.key) {
    // The room told us about the message before the 202 arrived: keep that one.
    entries.delete(entry.key);
    entry.node?.remove();
  } else {
    keyByOperation.set(operation.id, entry.key);
    if (entry.status === "sending") entry.status = "sent";
    render(entry);
  }
  const stream = herald.follow(operation, { types: ["ChatMessageDelivered"] });
  stream.on("event", (event) => onOperationEvent(operation.id, event));
  stream.on("error", (error) => {
    const own = entries.get(keyByOperation.get(operation.id));
    if (own && own.status !== "delivered") {
      own.status = "failed";
      own.error = error.title || error.message;
      render(own);
    }
  });
}

function onOperationEvent(operationId, event) {
  if (event.type === "ChatMessageDelivered") return upsertMessage(event.data);
  if (event.type === "herald.operation.succeeded") return upsertMessage(event.data?.result);
  if (event.type === "herald.operation.failed" || event.type === "herald.operation.canceled") {
    const entry = entries.get(keyByOperation.get(operationId));
    if (!entry) return;
    entry.status = "failed";
    entry.error = event.data?.error?.title || event.type.slice("herald.operation.".length);
    render(entry);
  }
}

// Read receipts -----------------------------------------------------------------------

function onIntersect(changes) {
  for (const change of changes) {
    const key = change.target.dataset.key;
    if (change.isIntersecting) onScreen.add(key);
    else onScreen.delete(key);
  }
  markSeen();
}

/** Send a read receipt for every message of someone else that is on screen and not yet read. */
function markSeen() {
  if (document.visibilityState !== "visible") return;
  for (const key of onScreen) {
    const entry = entries.get(key);
    if (!entry || entry.own || !entry.id || entry.readBy.has(me) || readSent.has(entry.id)) continue;
    readSent.add(entry.id);
    herald.submit(`/chats/${room}/messages/${entry.id}/read`, { reader: me }).catch((error) => {
      readSent.delete(entry.id);
      showError(error);
    });
  }
}

// Joining -----------------------------------------------------------------------------

async function loadRecent(messagesUrl) {
  const recent = await herald.getJSON(messagesUrl);
  for (const message of recent.messages) upsertMessage(message);
  return recent;
}

async function retrying(task, attempts = 20) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await task();
    } catch (error) {
      if (attempt + 1 >= attempts || (error instanceof HeraldProblem && error.status < 500)) throw error;
      showError(error);
      await new Promise((resolve) => setTimeout(resolve, herald.backoff(attempt)));
    }
  }
}

async function join(name, roomName) {
  me = name;
  room = roomName;
  document.title = `#${room} · Herald chat`;
  $("room-name").textContent = `#${room}`;
  $("me").textContent = me;
  $("share").href = `/?room=${encodeURIComponent(room)}`;
  $("switch").href = `/?room=${encodeURIComponent(room)}&change=1`;
  $("join").hidden = true;
  $("chat").hidden = false;
  textarea.focus();
  showConnection("connecting");

  const info = await retrying(() => herald.getJSON(`/chats/${encodeURIComponent(room)}`));
  const recent = await retrying(() => loadRecent(info.messages_url));
  hideError();
  const stream = herald.subscribe(info.topic, {
    url: info.subscribe_url,
    websocketUrl: info.websocket_url,
    // "0-0" when the room is empty: replay from its start, so nothing sent meanwhile is missed.
    cursor: recent.cursor || "0-0",
    types: ROOM_EVENTS,
    onEvent: onRoomEvent,
    onGap: () => {
      showNotice("Some messages were missed while disconnected; the recent ones were reloaded.");
      loadRecent(info.messages_url).catch(showError);
    },
    onError: showError,
    refresh: async (signal) => {
      const fresh = await herald.getJSON(`/chats/${encodeURIComponent(room)}`, { signal });
      return { url: fresh.subscribe_url, websocketUrl: fresh.websocket_url };
    },
    // Polling reads the room's read model; each message comes back as a ChatMessageDelivered.
    poll: async ({ signal }) => {
      const page = await herald.getJSON(info.messages_url, { signal });
      return { cursor: page.cursor, events: page.messages.map((m) => ({ type: "ChatMessageDelivered", data: m })) };
    },
  });
  stream.state.subscribe(showConnection);
}

function showConnection(state) {
  const box = $("connection");
  box.dataset.state = state;
  box.querySelector(".label").textContent = STATE_LABELS[state] || state;
}

// Wiring ------------------------------------------------------------------------------

function updateCount() {
  const length = [...textarea.value].length; // code points, as the server counts them
  const count = $("count");
  count.textContent = length > MAX_TEXT * 0.9 ? `${length}/${MAX_TEXT}` : "";
  count.classList.toggle("over", length > MAX_TEXT);
}

textarea.addEventListener("input", updateCount);
textarea.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = textarea.value;
  if (!text.trim() || !room) return;
  hideError();
  textarea.value = "";
  updateCount();
  send(text);
});
$("error").querySelector(".dismiss").addEventListener("click", hideError);
document.addEventListener("visibilitychange", markSeen);

$("join").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("join-name").value.trim();
  const roomName = $("join-room").value.trim();
  if (!name || !ROOM_PATTERN.test(roomName)) return;
  const next = new URLSearchParams({ room: roomName, name });
  if (forced) next.set("transport", forced);
  history.replaceState(null, "", `/?${next}`);
  join(name, roomName).catch(showError);
});

const initialName = (params.get("name") || "").trim();
const initialRoom = (params.get("room") || "").trim();
showConnection("closed");
if (initialName && ROOM_PATTERN.test(initialRoom) && !params.has("change")) {
  join(initialName.slice(0, 64), initialRoom).catch(showError);
} else {
  $("join").hidden = false;
  $("join-name").value = initialName;
  if (initialRoom) $("join-room").value = initialRoom;
  (initialName ? $("join-room") : $("join-name")).focus();
}
