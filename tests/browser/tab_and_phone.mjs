// The tab and the phone, in a real headless Chromium: the tab's title shows the place; a
// visitor who allowed notifications and looks elsewhere is notified when the turn comes; a
// page whose network went away (a phone locking its screen) comes back at once when it
// returns, keeps its place, and goes in.
//
//   node tests/browser/tab_and_phone.mjs http://127.0.0.1:PORT
//
// The gate must guard /checkout with max_active = 1 and site_name = "Shop" in front of the
// demo shop. Exits non-zero with a message on the first failed expectation.
import { run, step, timeout } from "./launch.mjs";

const [base] = process.argv.slice(2);
if (!base) {
  console.error("usage: tab_and_phone.mjs BASE_URL");
  process.exit(2);
}

await run(async (browser) => {
  const first = await (await browser.newContext()).newPage();
  // The waiter: notifications allowed; whether the page is looked at is ours to say; each
  // notification shown is noted in localStorage (the page reloads when it goes in).
  const context = await browser.newContext({ permissions: ["notifications"] });
  await context.addInitScript(() => {
    // The feed's backoff at its longest jitter: retries 1.5, 4.5, 10.5 and 22.5 s after a
    // drop, so that coming back at once is told apart from a retry that happened to be due.
    Math.random = () => 0.999;
    Object.defineProperty(Document.prototype, "visibilityState", {
      get() { return localStorage.getItem("test-hidden") === "1" ? "hidden" : "visible"; },
    });
    const Real = window.Notification;
    window.Notification = function (title, options) {
      const shown = JSON.parse(localStorage.getItem("test-notifications") || "[]");
      shown.push({ title, body: options && options.body });
      localStorage.setItem("test-notifications", JSON.stringify(shown));
      return new Real(title, options);
    };
    window.Notification.permission = Real.permission;
    window.Notification.requestPermission = (...args) => Real.requestPermission(...args);
    // The sockets the page opens, so that the test can drop them as a locked phone does.
    const RealSocket = window.WebSocket;
    window.__sockets = [];
    window.WebSocket = function (url, protocols) {
      const socket = new RealSocket(url, protocols);
      window.__sockets.push(socket);
      return socket;
    };
    window.WebSocket.prototype = RealSocket.prototype;
  });
  const waiter = await context.newPage();

  await first.goto(`${base}/checkout`);
  await first.getByRole("heading", { name: "Checkout" }).waitFor({ timeout });
  await waiter.goto(`${base}/checkout`);
  await waiter.getByRole("heading", { name: "You are in line" }).waitFor({ timeout });
  const title = await waiter.title();
  if (title !== "(1) In line - Shop") throw new Error(`the tab's title is ${JSON.stringify(title)}`);
  step("the tab's title shows the place and the site: (1) In line - Shop");

  // The phone locks: the page is not looked at and its network is gone, long enough for the
  // feed's backoff to grow to several seconds.
  await waiter.waitForFunction(() => document.body.getAttribute("data-feed") === "open", null, { timeout });
  await waiter.evaluate(() => localStorage.setItem("test-hidden", "1"));
  await context.setOffline(true);
  await waiter.evaluate(() => window.__sockets.forEach((socket) => socket.close()));
  await waiter.waitForFunction(() => document.body.getAttribute("data-feed") === "closed", null, { timeout });
  await waiter.waitForTimeout(12_000); // the next try would be 22.5 s after the drop
  step("the feed is down while the phone is locked");

  // Meanwhile the turn comes.
  await first.getByRole("button", { name: "Place order" }).click();
  await first.getByRole("heading", { name: "Order placed" }).waitFor({ timeout });

  // The network comes back (the screen still locked): the page reconnects at once, learns it
  // is its turn, notifies, and goes in.
  const back = Date.now();
  await context.setOffline(false);
  await waiter.getByRole("heading", { name: "Checkout" }).waitFor({ timeout: 6_000 });
  const took = Date.now() - back;
  if (took > 3_000) throw new Error(`the page went in ${took} ms after the network came back: it waited for the backoff`);
  step(`back online, the page went in after ${took} ms, not after the backoff`);

  const shown = JSON.parse(await waiter.evaluate(() => localStorage.getItem("test-notifications") || "[]"));
  if (shown.length !== 1 || !shown[0].title.startsWith("It is your turn")) {
    throw new Error(`notifications shown: ${JSON.stringify(shown)}`);
  }
  step(`one notification: ${JSON.stringify(shown[0].title)}`);
});
