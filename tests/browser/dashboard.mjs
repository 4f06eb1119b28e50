// The operator's dashboard in a real headless Chromium: sign in with the admin token, watch a
// room's line-length chart move while a crowd joins, pause the room and push a message, and
// see a visitor's waiting page say both at once. On a phone and on a laptop.
//
//   node tests/browser/dashboard.mjs ADMIN_URL GATE_URL TOKEN [SCREENSHOT_DIR]
//
// The gate must guard /checkout with a room that lets at most one visitor in, so that a
// crowd waits. Exits non-zero with a message on the first failed expectation.
import { run, step, timeout } from "./launch.mjs";

const [admin, gate, token, screenshots] = process.argv.slice(2);
if (!admin || !gate || !token) {
  console.error("usage: dashboard.mjs ADMIN_URL GATE_URL TOKEN [SCREENSHOT_DIR]");
  process.exit(2);
}

await run(async (browser) => {
  // The operator, on a phone.
  const operatorContext = await browser.newContext({ viewport: { width: 390, height: 844 } });
  const operator = await operatorContext.newPage();
  const external = [];
  operator.on("request", request => { if (!request.url().startsWith(admin)) external.push(request.url()); });
  await operator.goto(`${admin}/`);
  await operator.locator("#token").fill("not-the-token-at-all");
  await operator.locator("#login-form button").click();
  await operator.getByText("The token was refused.").waitFor({ timeout });
  step("a wrong token is refused");
  await operator.locator("#token").fill(token);
  await operator.locator("#login-form button").click();
  const card = operator.locator('article[data-room="checkout"]');
  await card.waitFor({ timeout });
  await operator.getByText("ready", { exact: true }).waitFor({ timeout });
  step("signed in: the room's card and the instance's readiness are shown");

  // A crowd joins (API clients, each without cookies: each takes a ticket).
  for (let i = 0; i < 12; i++) {
    await fetch(`${gate}/checkout`, { headers: { accept: "application/json" } });
  }
  const waitingChart = card.locator('canvas[data-chart="waiting"]');
  await operator.waitForFunction(
    chart => Number(chart.dataset.last) >= 11 && Number(chart.dataset.points) >= 2,
    await waitingChart.elementHandle(), { timeout: 20_000 });
  const figure = await card.locator('[data-figure="waiting"]').textContent();
  step(`the line-length chart moved while the crowd joined (now ${figure} in line)`);

  // The token is kept for the tab: a reload does not ask again.
  await operator.reload();
  await card.waitFor({ timeout });
  step("the token is kept for the tab");

  // A visitor waiting, on another phone.
  const visitorContext = await browser.newContext({ viewport: { width: 320, height: 640 } });
  const visitor = await visitorContext.newPage();
  await visitor.goto(`${gate}/checkout`);
  await visitor.getByRole("heading", { name: "You are in line" }).waitFor({ timeout });

  await card.locator('button[data-action="paused"]').click();
  await visitor.getByRole("heading", { name: "The line is paused" }).waitFor({ timeout });
  await card.locator(".state", { hasText: "paused" }).waitFor({ timeout });
  step("Pause on the dashboard: the visitor's page says the line is paused");

  await card.locator('form[data-form="message"] input').fill("Restocking, back in ten minutes");
  await card.locator('form[data-form="message"] button').click();
  await visitor.getByText("Restocking, back in ten minutes").waitFor({ timeout });
  step("a message pushed from the dashboard reaches the waiting page");

  await card.locator('form[data-form="admit_per_minute"] input').fill("120");
  await card.locator('form[data-form="admit_per_minute"] button').click();
  await card.locator('[data-figure="admitted"]', { hasText: "/ 120" }).waitFor({ timeout });
  await card.locator(".overrides", { hasText: "admit_per_minute=120" }).waitFor({ timeout });
  step("the rate set from the dashboard is in force and shown as a live override");

  await card.locator('button[data-action="clear"]').click();
  await card.locator(".overrides", { hasText: "proxy.toml in force" }).waitFor({ timeout });
  step("back to proxy.toml");

  const overflow = await operator.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 0) throw new Error(`the dashboard is ${overflow} px wider than a phone`);
  if (external.length) throw new Error(`the dashboard fetched from elsewhere: ${external.join(", ")}`);
  step("fits a 390 px phone and fetches nothing from elsewhere");
  if (screenshots) {
    await operator.screenshot({ path: `${screenshots}/dashboard-390px.png`, fullPage: true });
    await operator.setViewportSize({ width: 1280, height: 900 });
    await operator.screenshot({ path: `${screenshots}/dashboard-1280px.png`, fullPage: true });
  }
});
