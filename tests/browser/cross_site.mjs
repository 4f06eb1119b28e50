// A page of another site, in a real headless Chromium: an admitted visitor opens it, and its
// forms post themselves to the shop (one to /_vestibule/leave, one into the room). The
// visitor's session and cookies must be as they were, and the visitor still in.
//
//   node tests/browser/cross_site.mjs http://127.0.0.1:PORT
//
// The gate must guard /checkout with a room that admits at once, in front of the demo shop.
// The other site is served here, on 127.0.0.2 (another site to the browser). Exits non-zero
// with a message on the first failed expectation.
import http from "node:http";
import { run, step, timeout } from "./launch.mjs";

const [base] = process.argv.slice(2);
if (!base) {
  console.error("usage: cross_site.mjs BASE_URL");
  process.exit(2);
}

// The other site: each page holds a form that submits itself to the shop.
const pages = {
  "/leave.html": `<form method="post" action="${base}/_vestibule/leave?room=checkout"></form>`,
  "/post.html": `<form method="post" action="${base}/checkout?from=elsewhere"><input name="x" value="1"></form>`,
};
const evil = http.createServer((request, response) => {
  const form = pages[request.url];
  response.writeHead(form ? 200 : 404, { "content-type": "text/html" });
  response.end(form ? `<!doctype html><body>${form}<script>document.forms[0].submit()</script></body>` : "");
});
await new Promise((resolve) => evil.listen(0, "127.0.0.2", resolve));
const elsewhere = `http://127.0.0.2:${evil.address().port}`;

async function status(page) {
  return page.evaluate(async () => (await (await fetch("/_vestibule/status?room=checkout")).json()).status);
}

async function vestibuleCookies(context) {
  const cookies = await context.cookies(base);
  return Object.fromEntries(cookies.filter((c) => c.name.startsWith("vestibule-")).map((c) => [c.name, c.value]));
}

try {
  await run(async (browser) => {
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(`${base}/checkout`);
    await page.getByRole("heading", { name: "Checkout" }).waitFor({ timeout });
    if ((await status(page)) !== "admitted") throw new Error("the visitor was not admitted");
    const before = await vestibuleCookies(context);
    if (!before["vestibule-token-checkout"]) throw new Error(`no token cookie: ${JSON.stringify(before)}`);
    step("the visitor is in, with a token cookie");

    // The other site's form posts to leave: refused, nothing cleared.
    const left = page.waitForResponse((r) => r.url().includes("/_vestibule/leave"), { timeout });
    await page.goto(`${elsewhere}/leave.html`);
    const answer = await left;
    if (answer.status() !== 403) throw new Error(`leave from another site answered ${answer.status()}`);
    await page.goto(`${base}/checkout`);
    await page.getByRole("heading", { name: "Checkout" }).waitFor({ timeout });
    if ((await status(page)) !== "admitted") throw new Error("the other site's form made the visitor leave");
    const afterLeave = await vestibuleCookies(context);
    if (JSON.stringify(afterLeave) !== JSON.stringify(before)) {
      throw new Error(`the cookies changed: ${JSON.stringify(before)} -> ${JSON.stringify(afterLeave)}`);
    }
    step("a form of another site posting to leave is refused (403); session and cookies as they were");

    // The other site's form posts into the room: sent back as a GET, which brings the
    // visitor's cookies; their token is kept, not replaced by a new ticket.
    await page.goto(`${elsewhere}/post.html`);
    await page.waitForURL(`${base}/checkout?from=elsewhere`, { timeout });
    await page.getByRole("heading", { name: "Checkout" }).waitFor({ timeout });
    if ((await status(page)) !== "admitted") throw new Error("the visitor lost their session");
    const afterPost = await vestibuleCookies(context);
    if (afterPost["vestibule-token-checkout"] !== before["vestibule-token-checkout"] || afterPost["vestibule-ticket-checkout"]) {
      throw new Error(`the cookies changed: ${JSON.stringify(before)} -> ${JSON.stringify(afterPost)}`);
    }
    step("a form of another site posting into the room lands on it as a GET; the token kept, no new ticket");
  });
} finally {
  evil.close();
}
