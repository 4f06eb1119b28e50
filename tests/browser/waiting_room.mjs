// The visitor's journey in a real headless Chromium: a protected page, the waiting page with
// its place changing live, and the hand-over to the shop when the turn comes.
//
//   node tests/browser/waiting_room.mjs http://127.0.0.1:PORT [screenshot.png]
//
// The gate must guard /checkout with max_active = 1 in front of the demo shop. Exits non-zero
// with a message on the first failed expectation.
import { run, step, timeout } from "./launch.mjs";

const [base, screenshot] = process.argv.slice(2);
if (!base) {
  console.error("usage: waiting_room.mjs BASE_URL [SCREENSHOT]");
  process.exit(2);
}

await run(async (browser) => {
  // Three visitors, each with their own cookies; phones, 320 px wide.
  const visitor = async () => {
    const context = await browser.newContext({ viewport: { width: 320, height: 640 } });
    return context.newPage();
  };
  const first = await visitor();
  const second = await visitor();
  const third = await visitor();

  await first.goto(`${base}/checkout`);
  await first.getByRole("heading", { name: "Checkout" }).waitFor({ timeout });
  step("an idle room lets the first visitor straight through to the shop");

  await second.goto(`${base}/checkout`);
  await third.goto(`${base}/checkout`);
  await third.getByRole("heading", { name: "You are in line" }).waitFor({ timeout });
  await third.waitForFunction(() => document.getElementById("position").textContent.trim() === "2", null, { timeout });
  step("the third visitor sees the waiting page at place 2");

  const overflow = await third.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
  if (overflow) throw new Error("the waiting page is wider than a 320 px phone");
  const live = await third.locator("[aria-live]").count();
  if (live < 1) throw new Error("no aria-live region on the waiting page");
  if (screenshot) await third.screenshot({ path: screenshot, fullPage: true });
  step("the page fits a 320 px screen and announces changes (aria-live)");

  // Mark the page: a live update must not reload it.
  await third.evaluate(() => { window.__notReloaded = true; });
  await first.getByRole("button", { name: "Place order" }).click();
  await first.getByRole("heading", { name: "Order placed" }).waitFor({ timeout });
  step("the first visitor places an order, which ends their session");

  await second.getByRole("heading", { name: "Checkout" }).waitFor({ timeout });
  step("the second visitor is handed over to the shop without doing anything");

  await third.waitForFunction(
    () => window.__notReloaded === true && document.getElementById("position").textContent.trim() === "1",
    null, { timeout });
  step("the third visitor's place changes to 1 live, without a reload");

  await second.getByRole("button", { name: "Place order" }).click();
  await third.getByRole("heading", { name: "Checkout" }).waitFor({ timeout });
  step("the third visitor lands on the page they asked for when their turn comes");
});
