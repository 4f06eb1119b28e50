// A newcomer in French while the store is away, in a real headless Chromium: the room's own
// page in their language says the line is paused and tries again by itself; when the store is
// back, the page joins the line without the visitor doing anything.
//
//   node tests/browser/outage.mjs http://127.0.0.1:PORT READY_FILE
//
// The gate must guard /checkout on a Redis that is away, with one visitor inside and
// max_active = 1. The page being held is announced by writing READY_FILE; the test then brings
// the store back. Exits non-zero with a message on the first failed expectation.
import fs from "node:fs";
import { run, step, timeout } from "./launch.mjs";

const [base, ready] = process.argv.slice(2);
if (!base || !ready) {
  console.error("usage: outage.mjs BASE_URL READY_FILE");
  process.exit(2);
}

await run(async (browser) => {
  const context = await browser.newContext({ locale: "fr-FR" });
  const page = await context.newPage();
  let loads = 0;
  page.on("load", () => { loads += 1; });
  const answer = await page.goto(`${base}/checkout`);
  if (answer.status() !== 503) throw new Error(`the held page answered ${answer.status()}`);
  if (!answer.headers()["retry-after"]) throw new Error("no Retry-After on the held page");
  await page.getByRole("heading", { name: "La file est en pause" }).waitFor({ timeout });
  const lang = await page.evaluate(() => document.documentElement.lang);
  if (lang !== "fr") throw new Error(`the page is in ${lang}`);
  const held = await page.locator("#held").textContent();
  if (!held.includes("rejoint la file d’elle-même") && !held.includes("rejoint la file d'elle-même")) {
    throw new Error(`the held page does not say it tries again: ${held}`);
  }
  if (await page.locator("#position").count()) throw new Error("a place is shown though none was taken");
  step("the newcomer gets the room's page in French: the line is paused, it will join by itself");

  fs.writeFileSync(ready, "held\n");
  // Back in 1 to 3 s at first (2 s, jittered by half either way), then 2 to 6 s, 4 to 12 s, up
  // to 15 to 45 s: a store restarted empty may take a few tries (its line is rebuilt first).
  // In line with a place, or straight into the shop if the room has a free place by then (a
  // store restarted empty knows the sessions this instance had seen at its last read).
  const joined = page.getByRole("heading", { name: /^(Vous êtes dans la file|Checkout)$/ });
  await joined.waitFor({ timeout: 120_000 });
  if ((await joined.textContent()) !== "Checkout") {
    await page.waitForFunction(() => /^\d+$/.test(document.getElementById("position").textContent.trim()), null, { timeout });
  }
  if (loads < 2) throw new Error("the page did not reload by itself");
  step("when the store is back the page reloads by itself into the line (or the shop)");
});
