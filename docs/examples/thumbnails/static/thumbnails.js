// Follows a thumbnail from the browser: submit, then the operation's events until it ends (docs/proxy.md).
import { Herald } from "/herald.js";

const herald = new Herald();
const log = document.getElementById("log");

document.getElementById("make").addEventListener("submit", async (event) => {
  event.preventDefault();
  const op = await herald.submit("/thumbnails", { url: event.target.url.value, size: 128 });
  for await (const update of herald.follow(op, { types: ["ThumbnailProgressed"] })) {
    const line = document.createElement("li");
    line.textContent = `${update.type} ${JSON.stringify(update.data)}`;
    log.append(line);
    if (update.type === "herald.operation.succeeded") {
      const thumbnail = await herald.getJSON(update.data.location);   // the proxied [[route]]
      document.getElementById("result").textContent = JSON.stringify(thumbnail);
    }
  }
});
